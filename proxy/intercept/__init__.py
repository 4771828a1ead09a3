"""Answering azure_local_ai.* calls: finding them in SQL, evaluating them locally, and handing the
values to the server inside the statement so that PostgreSQL itself produces the results."""

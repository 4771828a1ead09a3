"""SQLAlchemy 2 ORM with the pgvector package's Vector column type, on psycopg 3, through the proxy:
the calls as an application writes them with `func`, a mapped class with a vector column filled by
`CAST(azure_local_ai.create_embeddings(...) AS VECTOR(384))`, a `<=>` search through the type's
`cosine_distance`, and an executemany (psycopg's pipeline) with an error in the middle."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from pgvector.sqlalchemy import Vector
from sqlalchemy import REAL, BigInteger, Engine, Text, bindparam, cast, column, create_engine, func, insert, select
from sqlalchemy import text as sql_text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.exc import DBAPIError, IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from .driver_scenario import (
    BAD_MODEL,
    ERROR_SQLSTATES,
    SCENARIO,
    Reference,
    assert_equal_vector,
    check_batch,
    check_nearest,
    check_settings,
    check_single_calls,
)
from .pgcluster import PgCluster
from .proxyproc import ProxyProcess
from .test_functions_simple import DIM, MODEL


class Base(DeclarativeBase):
    pass


class Document(Base):
    __tablename__ = "sqlalchemy_documents"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    body: Mapped[str] = mapped_column(Text)
    embedding: Mapped[list[float]] = mapped_column(Vector(DIM))


def create_embeddings(model: object, text: object) -> object:
    return func.azure_local_ai.create_embeddings(model, text, type_=ARRAY(REAL))


def as_vector(expression: object) -> object:
    return cast(expression, Vector(DIM))


# psycopg's default prepare_threshold (5: the sixth execution of a statement runs a named server
# statement) and 0 (every statement prepared at its first execution).
CONNECT_ARGS = {"default": {}, "prepare_threshold=0": {"prepare_threshold": 0}}


@pytest.fixture(scope="module", params=list(CONNECT_ARGS))
def engine(request: pytest.FixtureRequest, proxy: ProxyProcess, pg: PgCluster) -> Iterator[Engine]:
    url = proxy.dsn().replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, connect_args=CONNECT_ARGS[request.param])
    Base.metadata.drop_all(engine)
    Base.metadata.create_all(engine)
    yield engine
    Base.metadata.drop_all(engine)
    engine.dispose()


@pytest.fixture
def session(engine: Engine) -> Iterator[Session]:
    with Session(engine) as session:
        yield session
        session.rollback()
        session.execute(Document.__table__.delete())
        session.commit()


def test_plain_parameterised_and_prepared_calls(session: Session, driver_reference: Reference) -> None:
    result = {
        "plain": session.execute(sql_text(f"SELECT azure_local_ai.create_embeddings('{MODEL}', "
                                          f"'{SCENARIO['plain'].replace(chr(39), chr(39) * 2)}')")).scalar_one(),
        "param": session.scalar(select(create_embeddings(MODEL, SCENARIO["param"]))),
    }
    statement = select(create_embeddings(bindparam("model"), bindparam("text")))  # one SQL text, run 8 times
    result["prepared"] = [session.scalar(statement, {"model": MODEL, "text": t}) for t in SCENARIO["prepared"]]
    check_single_calls(result, driver_reference)


def test_array_overload_with_ids(session: Session, driver_reference: Reference) -> None:
    rows = func.azure_local_ai.create_embeddings(
        MODEL, bindparam("inputs", SCENARIO["with_ids"]["inputs"], type_=ARRAY(Text)),
        cast(bindparam("ids", SCENARIO["with_ids"]["ids"]), ARRAY(BigInteger)),
    ).table_valued(column("id", BigInteger), column("embedding", ARRAY(REAL)))
    got = session.execute(select(rows.c.id, rows.c.embedding)).all()
    ids, expected = driver_reference.with_ids
    assert [r.id for r in got] == ids
    np.testing.assert_array_equal(np.array([r.embedding for r in got], np.float32), expected)


def test_vector_insert_and_nearest_neighbours(session: Session, driver_reference: Reference) -> None:
    """Mapped objects whose vector column is a SQL expression the proxy computes at flush; read back
    through the Vector type; searched with cosine_distance (`<=>`)."""
    session.add_all([Document(id=i, body=doc, embedding=as_vector(create_embeddings(MODEL, doc)))
                     for i, doc in enumerate(SCENARIO["docs"])])
    session.flush()
    for document in session.scalars(select(Document).order_by(Document.id)):
        assert_equal_vector(document.embedding, driver_reference.embedding(document.body))
    distance = Document.embedding.cosine_distance(as_vector(create_embeddings(MODEL, SCENARIO["query"])))
    nearest = session.execute(select(Document.body, distance).order_by(distance)).all()
    check_nearest({"nearest": [tuple(row) for row in nearest]}, driver_reference)


def test_vector_parameter_from_python(session: Session, driver_reference: Reference) -> None:
    """A numpy vector bound by the Vector type, compared with one the proxy computes in the same statement."""
    vector = driver_reference.embedding(SCENARIO["query"])
    session.add(Document(id=1, body=SCENARIO["query"], embedding=vector))
    session.flush()
    distance = session.scalar(select(Document.embedding.cosine_distance(
        as_vector(create_embeddings(MODEL, SCENARIO["query"])))).where(Document.id == 1))
    assert distance == pytest.approx(0, abs=1e-6)


def test_jsonb_and_text_results(session: Session, driver_reference: Reference) -> None:
    settings, setting, metadata = session.execute(select(
        func.azure_local_ai.get_setting(type_=JSONB),
        func.azure_local_ai.get_setting(SCENARIO["setting_key"], type_=Text),
        func.azure_local_ai.model_metadata(MODEL, type_=JSONB),
    )).one()
    check_settings({"settings": settings, "setting": setting, "metadata": metadata}, driver_reference)


INSERT_COMPUTED = insert(Document).values(
    id=bindparam("id"), body=bindparam("body"), embedding=as_vector(create_embeddings(bindparam("model"),
                                                                                      bindparam("body"))))


def test_executemany_batch(session: Session, driver_reference: Reference) -> None:
    """A list of parameter sets: one executemany, which psycopg 3 sends in pipeline mode."""
    session.execute(INSERT_COMPUTED, [{"id": i, "model": MODEL, "body": t} for i, t in enumerate(SCENARIO["batch"])])
    stored = session.scalars(select(Document.embedding).order_by(Document.id)).all()
    check_batch({"batch": stored}, driver_reference)


def failed_batch(session: Session, name: str) -> tuple[str, str, list[int]]:
    """Run an error batch; the error's class and SQLSTATE, and the rows left after the rollback."""
    rows = [{"id": i, "model": model, "body": t} for i, model, t in SCENARIO["error_batches"][name]]
    with pytest.raises(DBAPIError) as info:
        session.execute(INSERT_COMPUTED, rows)
    session.rollback()
    return type(info.value).__name__, info.value.orig.sqlstate, session.scalars(select(Document.id)).all()  # type: ignore[union-attr]


@pytest.mark.parametrize("name", list(ERROR_SQLSTATES))
def test_error_batch_as_on_a_direct_server(session: Session, stand_in_dsn: str, name: str) -> None:
    """Against a server whose own function raises the 42704 (driver_scenario.py): the same exception
    class, SQLSTATE and rows kept as through the proxy."""
    direct_engine = create_engine(stand_in_dsn.replace("postgresql://", "postgresql+psycopg://", 1))
    try:
        Base.metadata.create_all(direct_engine)
        with Session(direct_engine) as direct:
            expected = failed_batch(direct, name)
        assert expected[1] == ERROR_SQLSTATES[name]
        assert failed_batch(session, name) == expected
    finally:
        Base.metadata.drop_all(direct_engine)
        direct_engine.dispose()


@pytest.mark.parametrize("name", list(ERROR_SQLSTATES))
def test_error_in_the_middle_of_a_batch(session: Session, driver_reference: Reference, name: str) -> None:
    """The error surfaces as the DBAPI error with its SQLSTATE; the Session's transaction is rolled back
    (nothing of the batch is kept) and the Session goes on after rollback()."""
    rows = [{"id": i, "model": model, "body": t} for i, model, t in SCENARIO["error_batches"][name]]
    assert rows[1]["model"] == (BAD_MODEL if name == "intercepted" else MODEL)
    with pytest.raises(IntegrityError if name == "server" else DBAPIError) as info:
        session.execute(INSERT_COMPUTED, rows)
    assert info.value.orig.sqlstate == ERROR_SQLSTATES[name]  # type: ignore[union-attr]
    session.rollback()
    assert session.scalars(select(Document.id)).all() == []
    after = session.scalar(select(create_embeddings(MODEL, SCENARIO["after_error"])))
    assert_equal_vector(after, driver_reference.embedding(SCENARIO["after_error"]))
    session.add(Document(id=99, body="kept", embedding=[0.5] * DIM))
    session.commit()
    np.testing.assert_array_equal(session.get(Document, 99).embedding, [0.5] * DIM)  # type: ignore[union-attr]

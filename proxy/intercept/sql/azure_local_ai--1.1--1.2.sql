-- azure_local_ai 1.1 to 1.2: an answer handed over with the statement. For a one-row INSERT into a
-- table whose generated column embeds, the proxy reads the text from the statement, computes its
-- answer, and sets it in the session (azure_local_ai.proxy_kept) just before the statement runs, on
-- the session's own connection: create_embeddings of one text looks there first, and the row costs
-- no request, no mailbox and no other connection.

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '1.2'::text $$;

CREATE FUNCTION azure_local_ai_proxy.handed_over(model_uri text, input text) RETURNS text
LANGUAGE plpgsql VOLATILE AS $handed$
DECLARE
    -- What the proxy set: the answer's key, V, the payload's length, an MD5 over the session's secret,
    -- those and the payload; then the payload (as answers in the mailbox are, servercalls.py).
    answer text := current_setting('azure_local_ai.proxy_kept', true);
    secret text := split_part(current_setting('azure_local_ai.proxy_session', true), ' ', 2);
BEGIN
    IF coalesce(length(answer), 0) < 76 OR secret = '' THEN
        RETURN NULL;
    END IF;
    IF substr(answer, 1, 32) = md5(model_uri || E'\n' || input) AND substr(answer, 33, 1) = 'V'
       AND md5(secret || substr(answer, 1, 43) || substr(answer, 76)) = substr(answer, 44, 32) THEN
        PERFORM pg_catalog.set_config('azure_local_ai.proxy_kept', '', false);  -- for this statement only
        RETURN substr(answer, 76);
    END IF;
    RETURN NULL;
END
$handed$;

CREATE OR REPLACE FUNCTION azure_local_ai.create_embeddings(model_uri text, input text,
    timeout_ms integer DEFAULT 3600000)
RETURNS real[] LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT coalesce(azure_local_ai_proxy.handed_over(model_uri, input), azure_local_ai_proxy.ask('create_embeddings',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'input', input, 'timeout_ms', timeout_ms), timeout_ms))::real[] $$;

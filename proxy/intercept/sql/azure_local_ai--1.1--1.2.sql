-- azure_local_ai 1.1 to 1.2: an answer handed over with the statement. For a one-row INSERT into a
-- table whose generated column embeds, the proxy reads the text from the statement, computes its
-- answer, and sets it in the session (azure_local_ai.proxy_kept) just before the statement runs, on
-- the session's own connection: create_embeddings of one text looks there first, and the row costs
-- no request, no mailbox and no other connection. (PL/pgSQL rather than SQL: its plans are kept for
-- the session, and the check costs no second function call.)

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '1.2'::text $$;

CREATE OR REPLACE FUNCTION azure_local_ai.create_embeddings(model_uri text, input text,
    timeout_ms integer DEFAULT 3600000)
RETURNS real[] LANGUAGE plpgsql IMMUTABLE STRICT AS $create$
DECLARE
    -- What the proxy set: the answer's key, V, the payload's length, an MD5 over the session's secret,
    -- those and the payload; then the payload (as answers in the mailbox are, servercalls.py).
    answer text := current_setting('azure_local_ai.proxy_kept', true);
BEGIN
    IF length(answer) > 75 AND substr(answer, 1, 32) = md5(model_uri || E'\n' || input)
       AND substr(answer, 33, 1) = 'V'
       AND md5(split_part(current_setting('azure_local_ai.proxy_session', true), ' ', 2)
               || substr(answer, 1, 43) || substr(answer, 76)) = substr(answer, 44, 32) THEN
        PERFORM pg_catalog.set_config('azure_local_ai.proxy_kept', '', false);  -- for this statement only
        RETURN substr(answer, 76)::real[];
    END IF;
    RETURN azure_local_ai_proxy.ask('create_embeddings',
        pg_catalog.jsonb_build_object('model_uri', model_uri, 'input', input, 'timeout_ms', timeout_ms),
        timeout_ms)::real[];
END
$create$;

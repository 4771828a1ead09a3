-- azure_local_ai 1.0, as azure-local-ai-proxy installs it: what CREATE EXTENSION azure_local_ai,
-- sent through the proxy, creates in the client's own session (docs/server-calls.md).
--
-- The twelve functions of the schema azure_local_ai are real SQL functions. A call the proxy sees in
-- a statement with constant or bind-parameter arguments never reaches them: the proxy answers it
-- before the server runs the statement. A call the server evaluates (a generated column, a back-fill
-- over a column, a trigger, a view) runs azure_local_ai_proxy.ask: it sends the request to the
-- proxy as a NOTICE on its own session's connection (the proxy takes it out of the stream) and reads
-- the answer from the session's mailbox, a large object the proxy writes through a connection of
-- its own. Opened for writing, a large object reads as last committed, in every isolation level.

CREATE SCHEMA azure_local_ai;
CREATE SCHEMA azure_local_ai_proxy;
COMMENT ON SCHEMA azure_local_ai IS 'azure_local_ai 1.0 (installed by azure-local-ai-proxy)';
COMMENT ON SCHEMA azure_local_ai_proxy IS 'what the azure_local_ai functions need to reach azure-local-ai-proxy';
GRANT USAGE ON SCHEMA azure_local_ai, azure_local_ai_proxy TO PUBLIC;

CREATE FUNCTION azure_local_ai_proxy.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '1.0'::text $$;

CREATE FUNCTION azure_local_ai_proxy.ask(fn text, args jsonb, timeout_ms integer) RETURNS text
LANGUAGE plpgsql VOLATILE
SET client_min_messages = notice
SET lock_timeout = '1s'
AS $ask$
DECLARE
    session text := current_setting('azure_local_ai.proxy_session', true);
    box oid;
    secret text;
    key bigint;  -- the advisory lock the proxy holds while it works out the answer
    id text := md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text);
    -- Where in the mailbox this answer goes: a new place each time, for rewriting one place leaves a
    -- dead row version that every later read walks past, as long as the statement's snapshot lives.
    place bigint := floor(random() * 1048576)::bigint * 8192;
    mode integer := x'60000'::integer;  -- INV_READ | INV_WRITE: read what is committed, not the snapshot
    fd integer;
    raw bytea;
    head text;
    body text;
    problem jsonb;
    deadline timestamptz;
    polls integer := 0;
    alive timestamptz := clock_timestamp() + interval '1 second';
BEGIN
    IF coalesce(session, '') = '' THEN
        RAISE EXCEPTION 'azure_local_ai.% is answered by azure-local-ai-proxy, and this session is not connected through it', fn
            USING ERRCODE = '55000',
                  HINT = 'Connect to the proxy''s address rather than to the server itself, or ask the proxy''s operator to turn server_calls on.';
    END IF;
    IF fn IN ('set_setting', 'model_register', 'model_unload', 'model_unregister') AND NOT (
        (SELECT rolsuper FROM pg_catalog.pg_roles WHERE rolname = current_user) OR EXISTS (
            SELECT 1 FROM pg_catalog.pg_roles r
            WHERE r.rolname IN ('azure_pg_admin', 'azure_local_ai_setting_manager')
              AND pg_catalog.pg_has_role(current_user, r.oid, 'MEMBER'))) THEN
        RAISE EXCEPTION 'permission denied for function azure_local_ai.%', fn
            USING ERRCODE = '42501',
                  HINT = 'Only superusers and members of azure_pg_admin or azure_local_ai_setting_manager may change settings and models.';
    END IF;
    box := split_part(session, ' ', 1)::oid;
    secret := split_part(session, ' ', 2);
    key := ('x' || substr(md5(secret), 1, 15))::bit(60)::bigint;
    RAISE NOTICE USING ERRCODE = 'AL001', MESSAGE = 'azure-local-ai-proxy request',
        DETAIL = pg_catalog.jsonb_build_object('id', id, 'at', place, 'fn', fn, 'args', args,
                                              'role', current_user)::text;
    deadline := clock_timestamp() + make_interval(secs => greatest(timeout_ms, 0) / 1000.0 + 10);
    LOOP
        head := NULL;
        BEGIN
            fd := pg_catalog.lo_open(box, mode);
            PERFORM pg_catalog.lo_lseek64(fd, place, 0);
            raw := pg_catalog.loread(fd, 75);  -- zeros until the first answer comes
            IF substring(raw FROM 1 FOR 32) = convert_to(id, 'UTF8') THEN
                head := convert_from(raw, 'UTF8');
                body := convert_from(pg_catalog.loread(fd, substr(head, 34, 10)::integer), 'UTF8');
            END IF;
            PERFORM pg_catalog.lo_close(fd);
        EXCEPTION
            WHEN undefined_object OR insufficient_privilege THEN NULL;  -- the mailbox is not there yet
            WHEN read_only_sql_transaction THEN
                IF current_setting('transaction_isolation') <> 'read committed' THEN
                    RAISE EXCEPTION 'azure_local_ai.% cannot get its answer in a read-only % transaction', fn,
                        upper(current_setting('transaction_isolation'))
                        USING ERRCODE = '25006',
                              HINT = 'Call it in a read-write transaction, or in a READ COMMITTED one.';
                END IF;
                mode := x'40000'::integer;  -- read-only: through the snapshot, new for each poll
        END;
        IF substr(head, 1, 32) = id THEN
            IF md5(secret || substr(head, 1, 43) || body) <> substr(head, 44, 32) THEN
                RAISE EXCEPTION 'an answer to azure_local_ai.% did not come from azure-local-ai-proxy', fn
                    USING ERRCODE = '28000';
            END IF;
            CASE substr(head, 33, 1)
                WHEN 'V' THEN RETURN body;
                WHEN 'N' THEN RETURN NULL;
                ELSE
                    problem := body::jsonb;
                    RAISE EXCEPTION USING ERRCODE = problem->>'code', MESSAGE = problem->>'message',
                        HINT = coalesce(problem->>'hint', ''), DETAIL = coalesce(problem->>'detail', '');
            END CASE;
        END IF;
        IF clock_timestamp() > deadline THEN
            RAISE EXCEPTION 'azure-local-ai-proxy did not answer azure_local_ai.% within % ms', fn, timeout_ms
                USING ERRCODE = '57014', HINT = 'See the proxy''s log.';
        END IF;
        IF clock_timestamp() > alive THEN
            -- Once a second: the proxy drops this, and if the client is gone the write ends the session.
            RAISE NOTICE USING ERRCODE = 'AL002', MESSAGE = 'azure-local-ai-proxy waiting';
            alive := clock_timestamp() + interval '1 second';
        END IF;
        IF pg_catalog.pg_try_advisory_lock_shared(key) THEN
            -- The proxy has not taken the lock yet (or could not): look again soon. Every half
            -- millisecond for the first 25 looks, then every 4 ms.
            PERFORM pg_catalog.pg_advisory_unlock_shared(key);
            polls := polls + 1;
            PERFORM pg_catalog.pg_sleep(CASE WHEN polls <= 25 THEN 0.0005 ELSE 0.004 END);
        ELSE
            -- The proxy is working on it, and lets go of the lock as it writes the answer: sleep until
            -- then (a second at most, lock_timeout, for the checks above), costing the server nothing.
            BEGIN
                PERFORM pg_catalog.pg_advisory_lock_shared(key);
                PERFORM pg_catalog.pg_advisory_unlock_shared(key);
            EXCEPTION WHEN lock_not_available THEN NULL;
            END;
        END IF;
    END LOOP;
END
$ask$;

CREATE FUNCTION azure_local_ai.create_embeddings(model_uri text, input text, timeout_ms integer DEFAULT 3600000)
RETURNS real[] LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT azure_local_ai_proxy.ask('create_embeddings',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'input', input, 'timeout_ms', timeout_ms), timeout_ms)::real[] $$;

CREATE FUNCTION azure_local_ai.create_embeddings(model_uri text, inputs text[], batch_size bigint DEFAULT 128,
    timeout_ms integer DEFAULT 3600000)
RETURNS TABLE(embedding real[]) LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT u.e::real[] FROM unnest(azure_local_ai_proxy.ask('create_embeddings',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'inputs', to_jsonb(inputs), 'batch_size', batch_size,
        'timeout_ms', timeout_ms), timeout_ms)::text[]) WITH ORDINALITY AS u(e, n) ORDER BY u.n $$;

CREATE FUNCTION azure_local_ai.create_embeddings(model_uri text, inputs text[], ids anyarray,
    batch_size bigint DEFAULT 128, timeout_ms integer DEFAULT 3600000)
RETURNS TABLE(id anyelement, embedding real[]) LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT u.i, u.e::real[] FROM unnest(ids, azure_local_ai_proxy.ask('create_embeddings',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'inputs', to_jsonb(inputs), 'batch_size', batch_size,
        'timeout_ms', timeout_ms, 'ids_count', cardinality(ids)), timeout_ms)::text[]) WITH ORDINALITY AS u(i, e, n)
    ORDER BY u.n $$;

CREATE FUNCTION azure_local_ai.get_setting(keys text[] DEFAULT ARRAY[]::text[], timeout_ms integer DEFAULT 3600000)
RETURNS jsonb LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('get_setting',
    pg_catalog.jsonb_build_object('keys', to_jsonb(keys), 'timeout_ms', timeout_ms), timeout_ms)::jsonb $$;

CREATE FUNCTION azure_local_ai.get_setting(key text, timeout_ms integer DEFAULT 3600000)
RETURNS text LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('get_setting',
    pg_catalog.jsonb_build_object('key', key, 'timeout_ms', timeout_ms), timeout_ms) $$;

CREATE FUNCTION azure_local_ai.model_loaded(model_uri text, timeout_ms integer DEFAULT 3600000)
RETURNS boolean LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_loaded',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'timeout_ms', timeout_ms), timeout_ms)::boolean $$;

CREATE FUNCTION azure_local_ai.model_metadata(model_uri text)
RETURNS jsonb LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_metadata',
    pg_catalog.jsonb_build_object('model_uri', model_uri), 3600000)::jsonb $$;

CREATE FUNCTION azure_local_ai.model_register(model_uri text, model_path text, tokenizer_path text DEFAULT NULL,
    timeout_ms integer DEFAULT 3600000)
RETURNS bigint LANGUAGE sql
AS $$ SELECT CASE WHEN model_uri IS NULL OR model_path IS NULL OR timeout_ms IS NULL THEN NULL
    ELSE azure_local_ai_proxy.ask('model_register', pg_catalog.jsonb_build_object('model_uri', model_uri,
        'model_path', model_path, 'tokenizer_path', tokenizer_path, 'timeout_ms', timeout_ms), timeout_ms)::bigint
    END $$;

CREATE FUNCTION azure_local_ai.model_unload(model_uri text, timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_unload',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'timeout_ms', timeout_ms), timeout_ms) $$;

CREATE FUNCTION azure_local_ai.model_unregister(model_uri text, timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_unregister',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'timeout_ms', timeout_ms), timeout_ms) $$;

CREATE FUNCTION azure_local_ai.set_setting(keys text[], "values" text[], timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('set_setting',
    pg_catalog.jsonb_build_object('keys', to_jsonb(keys), 'values', to_jsonb("values"), 'timeout_ms', timeout_ms),
    timeout_ms) $$;

CREATE FUNCTION azure_local_ai.set_setting(key text, value text, timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('set_setting',
    pg_catalog.jsonb_build_object('key', key, 'value', value, 'timeout_ms', timeout_ms), timeout_ms) $$;

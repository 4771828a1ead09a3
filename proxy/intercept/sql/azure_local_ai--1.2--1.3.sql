-- azure_local_ai 1.2 to 1.3: nothing a session's search_path holds can stand in for what the
-- functions use, the functions that change settings and models are never evaluated by the server,
-- and a waiting function sleeps on a lock of its request's own.
--
-- * Every function runs with search_path = pg_catalog, pg_temp or names pg_catalog's objects itself:
--   a role that may create objects in a schema on a caller's search_path (a shadowing to_jsonb or
--   operator) cannot have its code run as the caller.
-- * set_setting, model_register, model_unload and model_unregister, evaluated by the server (inside
--   a function, a DO block, a trigger, a view), raise 0A000: their request would be a notice, which
--   any code in the session can raise in any role's name. Called with constant arguments or bind
--   parameters in a statement the client sends, the proxy answers them itself, checking the caller.
-- * The advisory lock a waiting function sleeps on is keyed by the MD5 of the session's secret and
--   the request's id, new for each request: another role that sees one held cannot hold the next,
--   and it sleeps 50 ms at a time, not a second.

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '1.3'::text $$;

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.ask(fn text, args jsonb, timeout_ms integer) RETURNS text
LANGUAGE plpgsql VOLATILE
SET client_min_messages = notice
SET lock_timeout = '50ms'
SET search_path = pg_catalog, pg_temp
AS $ask$
DECLARE
    session text := current_setting('azure_local_ai.proxy_session', true);
    box oid;
    secret text;
    key bigint;  -- the advisory lock the proxy holds while it works out the answer
    id text;
    -- Where in the mailbox this answer goes: a new place each time, mostly, for rewriting one place
    -- leaves a dead row version that every later read walks past, as long as the statement's snapshot
    -- lives. (A session has one request out at a time, so a place chosen again is one already read.)
    place bigint := 67108864 + floor(random() * 4096)::bigint * 8192;
    mode integer := x'60000'::integer;  -- INV_READ | INV_WRITE: read what is committed, not the snapshot
    fd integer;
    raw bytea;
    head text;
    body text;
    problem jsonb;
    deadline timestamptz;
    polls integer := 0;
    woken boolean := false;
    alive timestamptz := clock_timestamp() + interval '1 second';
BEGIN
    IF coalesce(session, '') = '' THEN
        RAISE EXCEPTION 'azure_local_ai.% is answered by azure-local-ai-proxy, and this session is not connected through it', fn
            USING ERRCODE = '55000',
                  HINT = 'Connect to the proxy''s address rather than to the server itself, or ask the proxy''s operator to turn server_calls on.';
    END IF;
    IF fn IN ('set_setting', 'model_register', 'model_unload', 'model_unregister') THEN
        -- Any code in a session can raise a notice shaped like a request, in any role's name: the proxy
        -- cannot tell who asks, so what changes settings and models is never asked for this way.
        RAISE EXCEPTION 'azure_local_ai.% cannot be evaluated by the server through azure-local-ai-proxy', fn
            USING ERRCODE = '0A000',
                  HINT = format('Call azure_local_ai.%s with constant arguments or bind parameters, in a statement the client sends: the proxy checks the caller''s rights there. Not inside a function, a DO block, a trigger or a view.', fn);
    END IF;
    box := split_part(session, ' ', 1)::oid;
    secret := split_part(session, ' ', 2);
    IF fn = 'create_embeddings' AND args ? 'input' THEN
        -- An answer kept ahead: at one of 4,096 places of 16 kB, by the first 12 bits of its key.
        id := md5((args->>'model_uri') || E'\n' || (args->>'input'));
        BEGIN
            fd := pg_catalog.lo_open(box, mode);
            PERFORM pg_catalog.lo_lseek64(fd, ('x' || substr(id, 1, 3))::bit(12)::integer * 16384, 0);
            raw := pg_catalog.loread(fd, 75);
            IF substring(raw FROM 1 FOR 32) = convert_to(id, 'UTF8') THEN
                head := convert_from(raw, 'UTF8');
                body := convert_from(pg_catalog.loread(fd, substr(head, 34, 10)::integer), 'UTF8');
            END IF;
            PERFORM pg_catalog.lo_close(fd);
        EXCEPTION
            -- No mailbox yet, or not for this role, or a read-only transaction: the request says.
            WHEN undefined_object OR insufficient_privilege OR read_only_sql_transaction THEN NULL;
        END;
        -- A place is written over by later answers: read as one was being written, or not signed with
        -- the session's secret, the answer is not used, and the request asks.
        IF substr(head, 1, 32) = id AND substr(head, 33, 1) = 'V'
           AND md5(secret || substr(head, 1, 43) || body) = substr(head, 44, 32) THEN
            RETURN body;
        END IF;
        head := NULL;
    END IF;
    id := md5(random()::text || clock_timestamp()::text || pg_backend_pid()::text);
    -- A lock of this request's own: another role that sees it held in pg_locks cannot stall the next.
    key := ('x' || substr(md5(secret || id), 1, 15))::bit(60)::bigint;
    RAISE NOTICE USING ERRCODE = 'AL001', MESSAGE = 'azure-local-ai-proxy request',
        DETAIL = pg_catalog.jsonb_build_object('id', id, 'at', place, 'fn', fn, 'args', args,
                                              'role', current_user, 'kept', true, 'keyed', true)::text;
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
        IF woken THEN
            -- The proxy let go of the lock as it wrote the answer, which its commit is about to show.
            woken := false;
            PERFORM pg_catalog.pg_sleep(0.0001);
        ELSIF pg_catalog.pg_try_advisory_lock_shared(key) THEN
            -- The proxy has not taken the lock yet (or could not, or has the answer at hand): look
            -- again soon. Every 0.2 ms for the first 5 looks, every half millisecond up to 25, then
            -- every 4 ms.
            PERFORM pg_catalog.pg_advisory_unlock_shared(key);
            polls := polls + 1;
            PERFORM pg_catalog.pg_sleep(CASE WHEN polls <= 5 THEN 0.0002 WHEN polls <= 25 THEN 0.0005 ELSE 0.004 END);
        ELSE
            -- The proxy is working on it, and lets go of the lock as it writes the answer: sleep until
            -- then (50 ms at most, lock_timeout, for the checks above: another role that took the lock as the
            -- proxy let go of it costs a call no more), costing the server nothing.
            BEGIN
                PERFORM pg_catalog.pg_advisory_lock_shared(key);
                PERFORM pg_catalog.pg_advisory_unlock_shared(key);
                woken := true;
            EXCEPTION WHEN lock_not_available THEN NULL;
            END;
        END IF;
    END LOOP;
END
$ask$;

CREATE OR REPLACE FUNCTION azure_local_ai.create_embeddings(model_uri text, input text,
    timeout_ms integer DEFAULT 3600000)
RETURNS real[] LANGUAGE plpgsql IMMUTABLE STRICT
SET search_path = pg_catalog, pg_temp AS $create$
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

CREATE OR REPLACE FUNCTION azure_local_ai.create_embeddings(model_uri text, inputs text[], batch_size bigint DEFAULT 128,
    timeout_ms integer DEFAULT 3600000)
RETURNS TABLE(embedding real[]) LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT u.e::pg_catalog.float4[] FROM pg_catalog.unnest(azure_local_ai_proxy.ask('create_embeddings',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'inputs', pg_catalog.to_jsonb(inputs), 'batch_size', batch_size,
        'timeout_ms', timeout_ms), timeout_ms)::pg_catalog.text[]) WITH ORDINALITY AS u(e, n) ORDER BY u.n $$;

CREATE OR REPLACE FUNCTION azure_local_ai.create_embeddings(model_uri text, inputs text[], ids anyarray,
    batch_size bigint DEFAULT 128, timeout_ms integer DEFAULT 3600000)
RETURNS TABLE(id anyelement, embedding real[]) LANGUAGE sql IMMUTABLE STRICT
AS $$ SELECT u.i, u.e::pg_catalog.float4[] FROM ROWS FROM (pg_catalog.unnest(ids), pg_catalog.unnest(azure_local_ai_proxy.ask('create_embeddings',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'inputs', pg_catalog.to_jsonb(inputs), 'batch_size', batch_size,
        'timeout_ms', timeout_ms, 'ids_count', pg_catalog.cardinality(ids)), timeout_ms)::pg_catalog.text[])) WITH ORDINALITY AS u(i, e, n)
    ORDER BY u.n $$;

CREATE OR REPLACE FUNCTION azure_local_ai.get_setting(keys text[] DEFAULT ARRAY[]::text[], timeout_ms integer DEFAULT 3600000)
RETURNS jsonb LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('get_setting',
    pg_catalog.jsonb_build_object('keys', pg_catalog.to_jsonb(keys), 'timeout_ms', timeout_ms), timeout_ms)::pg_catalog.jsonb $$;

CREATE OR REPLACE FUNCTION azure_local_ai.get_setting(key text, timeout_ms integer DEFAULT 3600000)
RETURNS text LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('get_setting',
    pg_catalog.jsonb_build_object('key', key, 'timeout_ms', timeout_ms), timeout_ms) $$;

CREATE OR REPLACE FUNCTION azure_local_ai.model_loaded(model_uri text, timeout_ms integer DEFAULT 3600000)
RETURNS boolean LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_loaded',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'timeout_ms', timeout_ms), timeout_ms)::pg_catalog.bool $$;

CREATE OR REPLACE FUNCTION azure_local_ai.model_metadata(model_uri text)
RETURNS jsonb LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_metadata',
    pg_catalog.jsonb_build_object('model_uri', model_uri), 3600000)::pg_catalog.jsonb $$;

CREATE OR REPLACE FUNCTION azure_local_ai.model_register(model_uri text, model_path text, tokenizer_path text DEFAULT NULL,
    timeout_ms integer DEFAULT 3600000)
RETURNS bigint LANGUAGE sql
AS $$ SELECT CASE WHEN model_uri IS NULL OR model_path IS NULL OR timeout_ms IS NULL THEN NULL
    ELSE azure_local_ai_proxy.ask('model_register', pg_catalog.jsonb_build_object('model_uri', model_uri,
        'model_path', model_path, 'tokenizer_path', tokenizer_path, 'timeout_ms', timeout_ms), timeout_ms)::pg_catalog.int8
    END $$;

CREATE OR REPLACE FUNCTION azure_local_ai.model_unload(model_uri text, timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_unload',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'timeout_ms', timeout_ms), timeout_ms) $$;

CREATE OR REPLACE FUNCTION azure_local_ai.model_unregister(model_uri text, timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('model_unregister',
    pg_catalog.jsonb_build_object('model_uri', model_uri, 'timeout_ms', timeout_ms), timeout_ms) $$;

CREATE OR REPLACE FUNCTION azure_local_ai.set_setting(keys text[], "values" text[], timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('set_setting',
    pg_catalog.jsonb_build_object('keys', pg_catalog.to_jsonb(keys), 'values', pg_catalog.to_jsonb("values"), 'timeout_ms', timeout_ms),
    timeout_ms) $$;

CREATE OR REPLACE FUNCTION azure_local_ai.set_setting(key text, value text, timeout_ms integer DEFAULT 3600000)
RETURNS void LANGUAGE sql STRICT
AS $$ SELECT azure_local_ai_proxy.ask('set_setting',
    pg_catalog.jsonb_build_object('key', key, 'value', value, 'timeout_ms', timeout_ms), timeout_ms) $$;

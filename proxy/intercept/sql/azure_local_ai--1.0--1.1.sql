-- azure_local_ai 1.0 to 1.1: answers kept ahead, and a compact mailbox. A statement over many rows
-- asks for embeddings the proxy can foresee (a back-fill, a generated column over existing rows,
-- INSERT ... SELECT): it computes them in batches and writes each answer into the statement's mailbox
-- ahead of the request, at a place given by the MD5 of the model and the text. create_embeddings of
-- one text looks there first, and asks only when the answer is not there: most rows then cost the
-- server one read of a large object, and the proxy nothing.
--
-- The mailbox's first 64 MB hold answers kept ahead (4,096 places of 16 kB), the next 32 MB answers
-- to requests (4,096 places of 8 kB), where 1.0 spread them over 8 GB: a pg_dump taken while a
-- statement runs reads the whole extent of its mailbox, holes included.

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '1.1'::text $$;

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.ask(fn text, args jsonb, timeout_ms integer) RETURNS text
LANGUAGE plpgsql VOLATILE
SET client_min_messages = notice
SET lock_timeout = '1s'
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
    key := ('x' || substr(md5(secret), 1, 15))::bit(60)::bigint;
    RAISE NOTICE USING ERRCODE = 'AL001', MESSAGE = 'azure-local-ai-proxy request',
        DETAIL = pg_catalog.jsonb_build_object('id', id, 'at', place, 'fn', fn, 'args', args,
                                              'role', current_user, 'kept', true)::text;
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
            -- then (a second at most, lock_timeout, for the checks above), costing the server nothing.
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

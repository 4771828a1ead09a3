-- azure_local_ai 1.4 to 1.5: a statement_timeout is never lost while a call waits for its answer, and
-- errors carry no empty DETAIL or HINT.
--
-- * The function waits for its answer on the proxy's advisory lock, 50 ms at a time (lock_timeout).
--   Where the statement's timeout, or a client's cancel, falls due in the same moment as that wait's,
--   PostgreSQL reports the lock's timeout only (ProcessInterrupts), which the wait takes as a turn of
--   its loop: the statement went on to its end. From 1.5 the wait raises the statement's timeout
--   itself once it has passed; a cancel is the proxy's to answer (it relays it, and answers the
--   statement's calls with the cancel's error).
-- * An error the proxy answers with had DETAIL and HINT set to '' where it had none, which clients
--   show as empty lines.

CREATE OR REPLACE FUNCTION azure_local_ai_proxy.version() RETURNS text
LANGUAGE sql IMMUTABLE AS $$ SELECT '1.5'::text $$;

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
    seen boolean := false;  -- a sign of the proxy: its lock held, its mailbox made
    unseen_until timestamptz;
BEGIN
    IF fn IN ('set_setting', 'model_register', 'model_unload', 'model_unregister') THEN
        -- Any code in a session can raise a notice shaped like a request, in any role's name: the proxy
        -- cannot tell who asks, so what changes settings and models is never asked for this way.
        RAISE EXCEPTION 'azure_local_ai.% cannot be evaluated by the server through azure-local-ai-proxy', fn
            USING ERRCODE = '0A000',
                  HINT = format('Call azure_local_ai.%s with constant arguments or bind parameters, in a statement the client sends: the proxy checks the caller''s rights there. Not inside a function, a DO block, a trigger or a view.', fn);
    END IF;
    IF coalesce(session, '') = '' THEN
        -- The transaction's mailbox, chosen here and sent with the request: an OID of the top half
        -- (where the server hands out none) and a secret of 128 random bits.
        session := (2147483648 + ('x' || substr(md5(pg_catalog.gen_random_uuid()::text), 1, 8))::bit(32)::bigint
                    % 2147483646)::text || ' '
                   || md5(pg_catalog.gen_random_uuid()::text || pg_catalog.gen_random_uuid()::text);
        PERFORM pg_catalog.set_config('azure_local_ai.proxy_session', session, true);  -- this transaction's
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
                                              'role', current_user, 'kept', true, 'keyed', true,
                                              'box', box, 'secret', secret, 'pid', pg_catalog.pg_backend_pid())::text;
    unseen_until := clock_timestamp() + interval '5 seconds';
    deadline := clock_timestamp() + make_interval(secs => greatest(timeout_ms, 0) / 1000.0 + 10);
    LOOP
        head := NULL;
        BEGIN
            fd := pg_catalog.lo_open(box, mode);
            seen := true;
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
                    IF problem->>'hint' IS NOT NULL THEN
                        RAISE EXCEPTION USING ERRCODE = problem->>'code', MESSAGE = problem->>'message',
                            HINT = problem->>'hint';
                    END IF;
                    RAISE EXCEPTION USING ERRCODE = problem->>'code', MESSAGE = problem->>'message';
            END CASE;
        END IF;
        IF NOT seen AND clock_timestamp() > unseen_until THEN
            RAISE EXCEPTION 'azure_local_ai.% is answered by azure-local-ai-proxy, and this session is not connected through it', fn
                USING ERRCODE = '55000',
                      HINT = 'Connect to the proxy''s address rather than to the server itself, or ask the proxy''s operator to turn server_calls on.';
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
            seen := true;
            -- The proxy is working on it, and lets go of the lock as it writes the answer: sleep until
            -- then (50 ms at most, lock_timeout, for the checks above: another role that took the lock as the
            -- proxy let go of it costs a call no more), costing the server nothing.
            BEGIN
                PERFORM pg_catalog.pg_advisory_lock_shared(key);
                PERFORM pg_catalog.pg_advisory_unlock_shared(key);
                woken := true;
            EXCEPTION WHEN lock_not_available THEN
                -- Where the statement's own timeout fell due as this wait timed out, PostgreSQL reports the
                -- wait's timeout, and the statement's is lost: it is raised here, as PostgreSQL words it.
                IF current_setting('statement_timeout') <> '0' AND clock_timestamp() - statement_timestamp()
                   >= current_setting('statement_timeout')::interval THEN
                    RAISE EXCEPTION USING ERRCODE = 'query_canceled',
                        MESSAGE = 'canceling statement due to statement timeout';
                END IF;
            END;
        END IF;
    END LOOP;
END
$ask$;

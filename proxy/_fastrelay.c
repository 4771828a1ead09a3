/* The relay's fast path: a thread of its own, outside the GIL, that moves a resting session's bytes
 * between its two sockets while nothing in them concerns the proxy.
 *
 * The Python relay (proxy/relay.py) hands a session over (`attach`) when its hook has nothing under
 * way: no statement being answered, no server replies being watched, nothing held. From then on this
 * thread frames both streams just enough to keep the counts the hook relies on (requests sent,
 * ReadyForQuery seen, the transaction status) and to notice what the hook must see: a Query or Parse
 * that names azure_local_ai, a Bind/Describe/Close of a statement the hook prepared, a ParameterStatus
 * or NoticeResponse from the server, anything malformed, an end of stream. Then it stops at that
 * message's first byte and hands the session back (`take`), with the bytes it holds and its counts:
 * the Python relay resumes exactly where the thread stopped, and its own framer sees the message.
 *
 * Why C: per transaction the interpreter's callbacks cost several times what PgBouncer's whole relay
 * does, and they compete with the server for the same cores. This thread does what PgBouncer does,
 * a read and a write per message batch, and touches no Python object. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* A direction's buffer starts small (a resting session costs little) and grows, up to BUF_MAX, while
 * reads fill it: bulk transfers then take fewer system calls. */
#define BUF_START (16 * 1024)
#define BUF_MAX (256 * 1024)
/* Messages the thread must read whole (Query, Parse, ...) longer than this go back to Python, which
 * reads long statements a window at a time. */
#define INSPECT_MAX (64 * 1024)

enum reason {
    R_NONE = 0,
    R_CLIENT_MESSAGE, /* a client message the hook must see */
    R_SERVER_MESSAGE, /* a server message the hook must see */
    R_CLIENT_CLOSED,  /* end of stream or an error on the client's socket */
    R_SERVER_CLOSED,
    R_DETACHED, /* Python asked for the session back */
};

typedef struct {
    unsigned char *buf;
    size_t cap;
    size_t len;     /* bytes held */
    size_t ready;   /* of those, the first `ready` are framed and go to the other side as they are */
    uint64_t skip;  /* bytes of a streamed message's body still to come after the held ones */
    int last_type;  /* the type of the last message whose header was framed */
} stream_t;

struct session;

typedef struct {
    struct session *session;
    int client_side;
} endpoint_t;

typedef struct session {
    uint64_t id;
    int client_fd, server_fd;
    int hooked;
    stream_t up, down; /* client to server, server to client */
    uint64_t syncs_sent, ready_count;
    int batch_open, uncertain, tx_status, in_query;
    double last_activity;
    uint64_t bytes_up, bytes_down;
    uint32_t max_message;
    unsigned char *marker; /* what Query and Parse messages the hook must see contain, in lower case: */
                           /* markers, each NUL-terminated, any one of which will do */
    size_t marker_len;
    unsigned char *watched; /* the prepared statements the hook must see, each NUL-terminated */
    size_t watched_len;
    int watching;
    unsigned char *unread; /* the last Query or Parse forwarded (type byte + body) */
    size_t unread_len;
    int reason;
    int client_mask, server_mask; /* the epoll events asked for on each socket */
    endpoint_t client_end, server_end;
    struct session *next;
} session_t;

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int epoll_fd = -1, notify_fd = -1;
static pthread_t thread;
static int started = 0;
static uint64_t next_id = 1;
static session_t *live = NULL;      /* attached sessions */
static session_t *done = NULL;      /* handed back, waiting for `take` */
static session_t *graveyard = NULL; /* taken; freed by the thread before its next epoll_wait */
static uint64_t total_up = 0, total_down = 0; /* bytes of sessions no longer attached */

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t be32(const unsigned char *p) {
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3];
}

/* ----------------------------------------------------------------------------- what the hook wants */

static unsigned char lower(unsigned char c) {
    return c >= 'A' && c <= 'Z' ? (unsigned char)(c + 32) : c;
}

static int matches_at(const unsigned char *at, const unsigned char *marker, size_t marker_len) {
    for (size_t i = 0; i < marker_len; i++)
        if (lower(at[i]) != marker[i]) return 0;
    return 1;
}

/* Whether `marker` (lower case) occurs in `data` in any case. A byte of the marker that case does not
 * change (the "_" of azure_local_ai) is looked for first, with memchr. */
static int has_marker(const unsigned char *data, size_t len, const unsigned char *marker, size_t marker_len) {
    if (marker_len == 0 || len < marker_len) return 0;
    size_t anchor = 0;
    while (anchor < marker_len && marker[anchor] >= 'a' && marker[anchor] <= 'z') anchor++;
    if (anchor == marker_len) { /* all letters: every position */
        for (size_t pos = 0; pos + marker_len <= len; pos++)
            if (matches_at(data + pos, marker, marker_len)) return 1;
        return 0;
    }
    const unsigned char *p = data + anchor, *last = data + len - (marker_len - anchor);
    while (p < last + 1) {
        const unsigned char *u = memchr(p, marker[anchor], (size_t)(last + 1 - p));
        if (u == NULL) return 0;
        if (matches_at(u - anchor, marker, marker_len)) return 1;
        p = u + 1;
    }
    return 0;
}

/* Whether any of the session's markers occurs in `data`. */
static int has_any_marker(const session_t *s, const unsigned char *data, size_t len) {
    size_t pos = 0;
    while (pos < s->marker_len) {
        const unsigned char *nul = memchr(s->marker + pos, 0, s->marker_len - pos);
        size_t n = nul == NULL ? s->marker_len - pos : (size_t)(nul - (s->marker + pos));
        if (has_marker(data, len, s->marker + pos, n)) return 1;
        pos += n + 1;
    }
    return 0;
}

/* The NUL-terminated name at body[pos]; its length, or -1 when there is none. */
static long cstring(const unsigned char *body, size_t len, size_t pos) {
    if (pos >= len) return -1;
    const unsigned char *nul = memchr(body + pos, 0, len - pos);
    return nul == NULL ? -1 : (long)(nul - (body + pos));
}

static int is_watched(const session_t *s, const unsigned char *name, size_t len) {
    size_t pos = 0;
    while (pos < s->watched_len) {
        size_t n = strlen((const char *)s->watched + pos);
        if (n == len && memcmp(s->watched + pos, name, len) == 0) return 1;
        pos += n + 1;
    }
    return 0;
}

static int valid_frontend_type(int t) {
    return t != 0 && strchr("QPBDECSHXdcfFp", t) != NULL;
}

/* Whether the thread must see a client message of this type whole. */
static int inspected_client_type(const session_t *s, int t) {
    if (!s->hooked) return 0;
    if (t == 'Q' || t == 'P') return 1;
    return s->watching && (t == 'B' || t == 'D' || t == 'C');
}

/* Whether the hook must see this whole client message: as the hook's `wants` would say, or more. */
static int hook_wants(const session_t *s, int t, const unsigned char *body, size_t len) {
    long n;
    switch (t) {
    case 'Q':
        return has_any_marker(s, body, len);
    case 'P':
        if (has_any_marker(s, body, len)) return 1;
        n = cstring(body, len, 0);
        return s->watching && (n < 0 || is_watched(s, body, (size_t)n));
    case 'B': {
        long portal = cstring(body, len, 0);
        if (portal < 0) return 1;
        n = cstring(body, len, (size_t)portal + 1);
        return n < 0 || is_watched(s, body + portal + 1, (size_t)n);
    }
    case 'D':
        return len >= 1 && body[0] == 'S';
    case 'C':
        if (len < 1 || body[0] != 'S') return 0;
        n = cstring(body, len, 1);
        return n < 0 || is_watched(s, body + 1, (size_t)n);
    }
    return 0;
}

static void count_client_message(session_t *s, int t) {
    if (t == 'S') {
        s->syncs_sent++;
        s->batch_open = 0;
    } else if (t == 'Q' || t == 'F') {
        s->syncs_sent++;
        s->uncertain = s->uncertain || s->batch_open;
    } else if (t != 'd' && t != 'c' && t != 'f') {
        /* COPY FROM STDIN data belongs to the request that started the COPY: it opens no batch. */
        s->batch_open = 1;
    }
}

static void remember_unread(session_t *s, const unsigned char *message, size_t total) {
    unsigned char *copy = realloc(s->unread, total);
    if (copy == NULL) return;
    memcpy(copy, message, total);
    s->unread = copy;
    s->unread_len = total;
}

/* Frame what `st` holds past its ready bytes. Returns 1 when a message the hook must see starts
 * at `st->ready` (the thread stops there), 0 when it waits for more bytes. */
static int frame(session_t *s, stream_t *st, int from_client) {
    size_t pos = st->ready;
    if (st->skip) {
        size_t take = st->len - pos < st->skip ? st->len - pos : (size_t)st->skip;
        pos += take;
        st->skip -= take;
        if (st->skip) {
            st->ready = pos;
            return 0;
        }
    }
    int stop = 0;
    while (st->len - pos >= 5) {
        const unsigned char *m = st->buf + pos;
        int t = m[0];
        uint32_t length = be32(m + 1);
        if (length < 4) { stop = 1; break; }
        uint64_t total = (uint64_t)length + 1;
        size_t have = st->len - pos;
        if (from_client) {
            if (!valid_frontend_type(t) || length > s->max_message) { stop = 1; break; }
            if (inspected_client_type(s, t)) {
                if (total > INSPECT_MAX) { stop = 1; break; }
                if (have < total) break;
                if (hook_wants(s, t, m + 5, length - 4)) { stop = 1; break; }
                if (t == 'Q' || t == 'P') remember_unread(s, m, (size_t)total);
            }
            count_client_message(s, t);
        } else {
            if (s->hooked && (t == 'S' || t == 'N')) { stop = 1; break; }
            if (t == 'Z') {
                if (have < 6) break;
                s->ready_count++;
                s->tx_status = m[5];
            }
        }
        st->last_type = t;
        if (have < total) {
            st->skip = total - have;
            pos = st->len;
            break;
        }
        pos += (size_t)total;
    }
    st->ready = pos;
    if (!from_client && st->last_type == 'Z' && st->ready == st->len && !st->skip) s->in_query = 0;
    return stop;
}

/* ----------------------------------------------------------------------------- the thread */

static void set_masks(session_t *s) {
    /* A side is read while what was read from it has all gone out; written while it has not. */
    int client = (s->up.ready ? 0 : EPOLLIN) | (s->down.ready ? EPOLLOUT : 0);
    int server = (s->down.ready ? 0 : EPOLLIN) | (s->up.ready ? EPOLLOUT : 0);
    struct epoll_event ev;
    if (client != s->client_mask) {
        ev.events = (uint32_t)client;
        ev.data.ptr = &s->client_end;
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, s->client_fd, &ev);
        s->client_mask = client;
    }
    if (server != s->server_mask) {
        ev.events = (uint32_t)server;
        ev.data.ptr = &s->server_end;
        epoll_ctl(epoll_fd, EPOLL_CTL_MOD, s->server_fd, &ev);
        s->server_mask = server;
    }
}

static void unlink_live(session_t *s) {
    for (session_t **p = &live; *p != NULL; p = &(*p)->next) {
        if (*p == s) {
            *p = s->next;
            break;
        }
    }
    s->next = NULL;
}

/* Stop relaying `s` and queue it for Python (under the lock). */
static void hand_back(session_t *s, int reason) {
    if (s->reason) return;
    s->reason = reason;
    /* Bytes read but not framed go to Python, which counts them itself when it frames them. */
    s->bytes_up -= s->up.len - s->up.ready;
    s->bytes_down -= s->down.len - s->down.ready;
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, s->client_fd, NULL);
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, s->server_fd, NULL);
    unlink_live(s);
    s->next = done;
    done = s;
}

/* Write what is ready to `fd`; 0, or -1 when the socket is gone. */
static int flush(stream_t *st, int fd) {
    while (st->ready) {
        ssize_t n = send(fd, st->buf, st->ready, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
            return -1;
        }
        memmove(st->buf, st->buf + n, st->len - (size_t)n);
        st->len -= (size_t)n;
        st->ready -= (size_t)n;
    }
    return 0;
}

static void on_readable(session_t *s, int from_client, uint32_t ev) {
    stream_t *st = from_client ? &s->up : &s->down;
    int src = from_client ? s->client_fd : s->server_fd;
    int dst = from_client ? s->server_fd : s->client_fd;
    if (st->ready) { /* still writing the last read: only a hang-up or an error is taken now */
        if (ev & (EPOLLHUP | EPOLLERR)) hand_back(s, from_client ? R_CLIENT_CLOSED : R_SERVER_CLOSED);
        return;
    }
    if (st->len == st->cap) {
        unsigned char *grown = st->cap < BUF_MAX ? realloc(st->buf, st->cap * 2) : NULL;
        if (grown == NULL) { /* a message to read whole that does not fit: Python's */
            hand_back(s, from_client ? R_CLIENT_MESSAGE : R_SERVER_MESSAGE);
            return;
        }
        st->buf = grown;
        st->cap *= 2;
    }
    size_t room = st->cap - st->len;
    ssize_t n = recv(src, st->buf + st->len, room, MSG_DONTWAIT);
    if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)) return;
    if (n <= 0) {
        /* Python reads the end of stream (or the error) again and closes as it does. */
        hand_back(s, from_client ? R_CLIENT_CLOSED : R_SERVER_CLOSED);
        return;
    }
    st->len += (size_t)n;
    if ((size_t)n == room && st->cap < BUF_MAX) {
        unsigned char *grown = realloc(st->buf, st->cap * 2);
        if (grown != NULL) {
            st->buf = grown;
            st->cap *= 2;
        }
    }
    s->last_activity = now();
    if (from_client) {
        s->bytes_up += (uint64_t)n;
        s->in_query = 1;
    } else {
        s->bytes_down += (uint64_t)n;
    }
    int stop = frame(s, st, from_client);
    if (flush(st, dst) < 0) {
        hand_back(s, from_client ? R_SERVER_CLOSED : R_CLIENT_CLOSED);
        return;
    }
    if (stop) {
        hand_back(s, from_client ? R_CLIENT_MESSAGE : R_SERVER_MESSAGE);
        return;
    }
    set_masks(s);
}

static void on_writable(session_t *s, int client_side) {
    /* The client's socket takes the server's stream, and the other way round. */
    stream_t *st = client_side ? &s->down : &s->up;
    if (flush(st, client_side ? s->client_fd : s->server_fd) < 0) {
        hand_back(s, client_side ? R_CLIENT_CLOSED : R_SERVER_CLOSED);
        return;
    }
    set_masks(s);
}

static void free_session(session_t *s) {
    free(s->up.buf);
    free(s->down.buf);
    free(s->watched);
    free(s->marker);
    free(s->unread);
    free(s);
}

static void *run(void *unused) {
    (void)unused;
    struct epoll_event events[64];
    for (;;) {
        pthread_mutex_lock(&lock);
        while (graveyard != NULL) {
            session_t *s = graveyard;
            graveyard = s->next;
            free_session(s);
        }
        pthread_mutex_unlock(&lock);
        int n = epoll_wait(epoll_fd, events, 64, -1);
        if (n < 0) continue;
        pthread_mutex_lock(&lock);
        int handed_back = 0;
        for (int i = 0; i < n; i++) {
            endpoint_t *end = events[i].data.ptr;
            session_t *s = end->session;
            if (s->reason) continue;
            uint32_t ev = events[i].events;
            if (ev & EPOLLOUT) on_writable(s, end->client_side);
            if (!s->reason && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR))) on_readable(s, end->client_side, ev);
            handed_back |= s->reason != 0;
        }
        pthread_mutex_unlock(&lock);
        if (handed_back) {
            uint64_t one = 1;
            ssize_t ignored = write(notify_fd, &one, sizeof one);
            (void)ignored;
        }
    }
    return NULL;
}

static int start(void) {
    if (started) return 0;
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    notify_fd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (epoll_fd < 0 || notify_fd < 0) return -1;
    /* Signals are for Python's thread: this one is created with all of them blocked. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&thread, NULL, run, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) return -1;
    pthread_detach(thread);
    started = 1;
    return 0;
}

/* ----------------------------------------------------------------------------- Python's side */

static PyObject *py_notify_fd(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    if (start() < 0) return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(notify_fd);
}

static int init_stream(stream_t *st, unsigned long long skip, int last) {
    st->buf = malloc(BUF_START);
    if (st->buf == NULL) return -1;
    st->cap = BUF_START;
    st->len = st->ready = 0;
    st->skip = skip;
    st->last_type = last;
    return 0;
}

static PyObject *py_attach(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *names[] = {
        "client_fd", "server_fd", "hooked", "marker", "watched", "max_message", "up_skip", "up_last", "down_skip",
        "down_last", "syncs_sent", "batch_open", "uncertain", "ready_count", "tx_status", "in_query",
        "last_activity", NULL};
    int client_fd, server_fd, hooked, up_last, down_last, batch_open, uncertain, tx_status, in_query;
    const char *marker, *watched;
    Py_ssize_t marker_len, watched_len;
    unsigned int max_message;
    unsigned long long up_skip, down_skip, syncs_sent, ready_count;
    double last_activity;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "iip$y#y#IKiKiKppKipd", names, &client_fd, &server_fd,
                                     &hooked, &marker, &marker_len, &watched, &watched_len, &max_message, &up_skip, &up_last, &down_skip,
                                     &down_last, &syncs_sent, &batch_open, &uncertain, &ready_count, &tx_status,
                                     &in_query, &last_activity))
        return NULL;
    if (start() < 0) return PyErr_SetFromErrno(PyExc_OSError);
    session_t *s = calloc(1, sizeof *s);
    if (s == NULL) return PyErr_NoMemory();
    if (init_stream(&s->up, up_skip, up_last) < 0 || init_stream(&s->down, down_skip, down_last) < 0 ||
        (watched_len && (s->watched = malloc((size_t)watched_len)) == NULL) ||
        (marker_len && (s->marker = malloc((size_t)marker_len)) == NULL)) {
        free_session(s);
        return PyErr_NoMemory();
    }
    if (watched_len) memcpy(s->watched, watched, (size_t)watched_len);
    if (marker_len) memcpy(s->marker, marker, (size_t)marker_len);
    s->marker_len = (size_t)marker_len;
    s->watched_len = (size_t)watched_len;
    s->watching = watched_len > 0;
    s->client_fd = client_fd;
    s->server_fd = server_fd;
    s->hooked = hooked;
    s->max_message = max_message;
    s->syncs_sent = syncs_sent;
    s->batch_open = batch_open;
    s->uncertain = uncertain;
    s->ready_count = ready_count;
    s->tx_status = tx_status;
    s->in_query = in_query;
    s->last_activity = last_activity;
    s->client_end = (endpoint_t){s, 1};
    s->server_end = (endpoint_t){s, 0};
    s->client_mask = s->server_mask = EPOLLIN;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &s->client_end};
    pthread_mutex_lock(&lock);
    s->id = next_id++;
    int failed = epoll_ctl(epoll_fd, EPOLL_CTL_ADD, client_fd, &ev) < 0;
    ev.data.ptr = &s->server_end;
    if (!failed && epoll_ctl(epoll_fd, EPOLL_CTL_ADD, server_fd, &ev) < 0) {
        epoll_ctl(epoll_fd, EPOLL_CTL_DEL, client_fd, NULL);
        failed = 1;
    }
    if (!failed) {
        s->next = live;
        live = s;
    }
    pthread_mutex_unlock(&lock);
    if (failed) {
        PyErr_SetFromErrno(PyExc_OSError);
        free_session(s);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(s->id);
}

/* What Python needs to resume a session: see relay.FastState. */
static PyObject *state_of(session_t *s) {
    PyObject *unread = s->unread ? PyBytes_FromStringAndSize((const char *)s->unread, (Py_ssize_t)s->unread_len)
                                 : (Py_INCREF(Py_None), Py_None);
    if (unread == NULL) return NULL;
    PyObject *out = Py_BuildValue(
        "(Kiy#y#Kiy#y#KiKiiKiidN)", (unsigned long long)s->id, s->reason, (const char *)s->up.buf,
        (Py_ssize_t)s->up.ready, (const char *)s->up.buf + s->up.ready, (Py_ssize_t)(s->up.len - s->up.ready),
        (unsigned long long)s->up.skip, s->up.last_type, (const char *)s->down.buf, (Py_ssize_t)s->down.ready,
        (const char *)s->down.buf + s->down.ready, (Py_ssize_t)(s->down.len - s->down.ready),
        (unsigned long long)s->down.skip, s->down.last_type, (unsigned long long)s->syncs_sent, s->batch_open,
        s->uncertain, (unsigned long long)s->ready_count, s->tx_status, s->in_query, s->last_activity, unread);
    return out;
}

static void bury(session_t *s) {
    total_up += s->bytes_up;
    total_down += s->bytes_down;
    s->next = graveyard;
    graveyard = s;
}

static PyObject *py_take(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    uint64_t count;
    ssize_t ignored = read(notify_fd, &count, sizeof count);
    (void)ignored;
    PyObject *list = PyList_New(0);
    if (list == NULL) return NULL;
    pthread_mutex_lock(&lock);
    session_t *taken = done;
    done = NULL;
    pthread_mutex_unlock(&lock);
    while (taken != NULL) {
        session_t *s = taken;
        taken = s->next;
        PyObject *state = state_of(s);
        if (state == NULL || PyList_Append(list, state) < 0) {
            Py_XDECREF(state);
            Py_DECREF(list);
            list = NULL;
        } else {
            Py_DECREF(state);
        }
        pthread_mutex_lock(&lock);
        bury(s);
        pthread_mutex_unlock(&lock);
    }
    return list;
}

static session_t *find(session_t *list, uint64_t id) {
    for (session_t *s = list; s != NULL; s = s->next)
        if (s->id == id) return s;
    return NULL;
}

static PyObject *py_detach(PyObject *self, PyObject *arg) {
    (void)self;
    uint64_t id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&lock);
    session_t *s = find(live, id);
    if (s != NULL) {
        hand_back(s, R_DETACHED);
    } else {
        s = find(done, id);
    }
    if (s != NULL) { /* out of the queue: this call takes it */
        for (session_t **p = &done; *p != NULL; p = &(*p)->next) {
            if (*p == s) {
                *p = s->next;
                break;
            }
        }
    }
    pthread_mutex_unlock(&lock);
    if (s == NULL) Py_RETURN_NONE;
    PyObject *state = state_of(s);
    pthread_mutex_lock(&lock);
    bury(s);
    pthread_mutex_unlock(&lock);
    return state;
}

static PyObject *py_activity(PyObject *self, PyObject *arg) {
    (void)self;
    uint64_t id = PyLong_AsUnsignedLongLong(arg);
    if (PyErr_Occurred()) return NULL;
    pthread_mutex_lock(&lock);
    session_t *s = find(live, id);
    PyObject *out = s == NULL ? NULL
                              : Py_BuildValue("(diKKii)", s->last_activity, s->in_query,
                                              (unsigned long long)s->syncs_sent, (unsigned long long)s->ready_count,
                                              s->tx_status, s->up.len == s->up.ready && s->up.skip == 0);
    pthread_mutex_unlock(&lock);
    if (s == NULL) Py_RETURN_NONE;
    return out;
}

static PyObject *py_bytes_relayed(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    pthread_mutex_lock(&lock);
    uint64_t up = total_up, down = total_down;
    for (session_t *s = live; s != NULL; s = s->next) {
        up += s->bytes_up;
        down += s->bytes_down;
    }
    for (session_t *s = done; s != NULL; s = s->next) {
        up += s->bytes_up;
        down += s->bytes_down;
    }
    pthread_mutex_unlock(&lock);
    return Py_BuildValue("(KK)", (unsigned long long)up, (unsigned long long)down);
}

static PyObject *py_has_marker(PyObject *self, PyObject *args) {
    (void)self;
    const char *data, *marker;
    Py_ssize_t len, marker_len;
    if (!PyArg_ParseTuple(args, "y#y#", &data, &len, &marker, &marker_len)) return NULL;
    return PyBool_FromLong(has_marker((const unsigned char *)data, (size_t)len, (const unsigned char *)marker,
                                      (size_t)marker_len));
}

static PyMethodDef methods[] = {
    {"notify_fd", py_notify_fd, METH_NOARGS, "The eventfd that becomes readable when sessions are handed back."},
    {"attach", (PyCFunction)(void (*)(void))py_attach, METH_VARARGS | METH_KEYWORDS,
     "Relay a resting session's two sockets in the thread; returns its id."},
    {"take", py_take, METH_NOARGS, "The states of the sessions handed back since the last call."},
    {"detach", py_detach, METH_O, "Take a session back now; its state, or None if it was taken already."},
    {"activity", py_activity, METH_O,
     "(last activity, in a query, requests sent, answered, transaction status, client at a message boundary) "
     "of an attached session, or None."},
    {"bytes_relayed", py_bytes_relayed, METH_NOARGS, "(client to server, server to client) bytes moved."},
    {"has_marker", py_has_marker, METH_VARARGS, "has_marker(data, marker): the thread's test for a marker."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_fastrelay", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastrelay(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    PyModule_AddIntConstant(m, "BUFFER_MAX", BUF_MAX);
    PyModule_AddIntConstant(m, "INSPECT_MAX", INSPECT_MAX);
    PyModule_AddIntConstant(m, "CLIENT_MESSAGE", R_CLIENT_MESSAGE);
    PyModule_AddIntConstant(m, "SERVER_MESSAGE", R_SERVER_MESSAGE);
    PyModule_AddIntConstant(m, "CLIENT_CLOSED", R_CLIENT_CLOSED);
    PyModule_AddIntConstant(m, "SERVER_CLOSED", R_SERVER_CLOSED);
    PyModule_AddIntConstant(m, "DETACHED", R_DETACHED);
    return m;
}

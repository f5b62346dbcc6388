/* The write end of the direct path, in C: one socket's frames of a loop turn, written with one send().
 *
 * Python's share of a delivery was ~3 us of user time per recipient at 40,000 deliveries/s, most of it
 * the chain of calls from the outbox to uvloop's transport.write, each run cold between two syscalls
 * that evict its caches. Here that chain is one C loop over the sinks of a turn.
 *
 * A sink writes to the socket itself only while the transport holds nothing: the transport's buffer is
 * empty, so whatever the kernel does not take goes to transport.write and keeps its place in the byte
 * stream. Nothing is written once the transport is closing (its fd may already be another socket's) or
 * the protocol has sent its close frame (RFC 6455 5.5.1). The reference for this behaviour, and the path
 * used where this module is not built, is fanout/sink.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <structmember.h>

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t limit;
    Py_ssize_t pending_bytes;
    PyObject *transport;
    PyObject *protocol;
    /* The frames of this turn, in order: a plain array (PyMem), not a list, so that a busy turn
     * allocates nothing the cyclic GC counts or scans (lists per sink were 4 % of the CPU at 200,000
     * deliveries/s, in gc_collect_main). Kept between turns; bytes objects hold no references. */
    PyObject **frames;
    Py_ssize_t nframes, cap;
} FdSink;

static PyObject *s_close_sent, *s_is_closing, *s_get_write_buffer_size, *s_write, *s_flush;

static int
sink_traverse(FdSink *self, visitproc visit, void *arg)
{
    Py_VISIT(self->transport);
    Py_VISIT(self->protocol);
    return 0;
}

static void
drop_frames(PyObject **frames, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        Py_DECREF(frames[i]);
}

static void
clear_frames(FdSink *self)
{
    Py_ssize_t n = self->nframes;
    self->nframes = 0;
    self->pending_bytes = 0;
    drop_frames(self->frames, n);
}

static int
sink_clear_refs(FdSink *self)
{
    Py_CLEAR(self->transport);
    Py_CLEAR(self->protocol);
    clear_frames(self);
    return 0;
}

static void
sink_dealloc(FdSink *self)
{
    PyObject_GC_UnTrack(self);
    sink_clear_refs(self);
    PyMem_Free(self->frames);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
sink_init(FdSink *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"fd", "transport", "protocol", "limit", NULL};
    int fd;
    Py_ssize_t limit;
    PyObject *transport, *protocol;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "iOOn", kwlist, &fd, &transport, &protocol, &limit))
        return -1;
    self->fd = fd;
    self->limit = limit;
    self->pending_bytes = 0;
    Py_INCREF(transport);
    Py_XSETREF(self->transport, transport);
    Py_INCREF(protocol);
    Py_XSETREF(self->protocol, protocol);
    clear_frames(self);
    return 0;
}

/* push(frame) -> 0: queued behind others; 1: the first of this turn (mark the sink); 2: over the limit. */
static PyObject *
sink_push(FdSink *self, PyObject *frame)
{
    if (!PyBytes_CheckExact(frame)) {
        PyErr_SetString(PyExc_TypeError, "a frame is bytes");
        return NULL;
    }
    if (self->nframes == self->cap) {
        Py_ssize_t cap = self->cap ? self->cap * 2 : 4;
        PyObject **grown = PyMem_Realloc(self->frames, (size_t)cap * sizeof(PyObject *));
        if (grown == NULL)
            return PyErr_NoMemory();
        self->frames = grown;
        self->cap = cap;
    }
    Py_INCREF(frame);
    self->frames[self->nframes++] = frame;
    int first = self->nframes == 1;
    self->pending_bytes += PyBytes_GET_SIZE(frame);
    return PyLong_FromLong(self->pending_bytes > self->limit ? 2 : first);
}

/* Calls on the transport and the protocol, looked up once per type instead of once per call.
 *
 * uvloop's transport and our protocol class have no instance attributes that could shadow their
 * methods or slots, so the type's entry is what an attribute lookup would find. Any other type (a
 * Python transport with an instance dict, say) is served by ordinary attribute lookups.
 */
typedef struct {
    PyTypeObject *type; /* borrowed: compared by identity only, and re-looked-up when it changes */
    PyObject *is_closing, *get_write_buffer_size, *write; /* unbound methods, or NULL: look up each time */
} TransportMethods;

static TransportMethods tm;
static PyTypeObject *protocol_type;
static Py_ssize_t close_sent_offset = -1; /* the slot's offset in the protocol object, or -1 */

static PyObject *
unbound(PyTypeObject *type, PyObject *name)
{
    PyObject *found = _PyType_Lookup(type, name); /* borrowed */
    if (found == NULL)
        return NULL;
    /* Kinds that bind the instance as their first argument: not staticmethod, classmethod or others. */
    const char *kind = Py_TYPE(found)->tp_name;
    size_t len = strlen(kind), tail = strlen("cython_function_or_method");
    int cython = len >= tail && strcmp(kind + len - tail, "cython_function_or_method") == 0;
    if (!(PyFunction_Check(found) || Py_IS_TYPE(found, &PyMethodDescr_Type) || cython))
        return NULL;
    Py_INCREF(found);
    return found;
}

static void
learn_transport(PyTypeObject *type)
{
    Py_CLEAR(tm.is_closing);
    Py_CLEAR(tm.get_write_buffer_size);
    Py_CLEAR(tm.write);
    tm.type = type;
    if (type->tp_dictoffset != 0)
        return;
    tm.is_closing = unbound(type, s_is_closing);
    tm.get_write_buffer_size = unbound(type, s_get_write_buffer_size);
    tm.write = unbound(type, s_write);
}

static PyObject *
call_transport(PyObject *transport, PyObject *method, PyObject *name, PyObject *arg)
{
    if (method != NULL) {
        PyObject *args[2] = {transport, arg};
        return PyObject_Vectorcall(method, args, arg == NULL ? 1 : 2, NULL);
    }
    return arg == NULL ? PyObject_CallMethodNoArgs(transport, name) : PyObject_CallMethodOneArg(transport, name, arg);
}

static int
close_sent(PyObject *protocol)
{
    PyTypeObject *type = Py_TYPE(protocol);
    if (type != protocol_type) {
        protocol_type = type;
        close_sent_offset = -1;
        PyObject *descr = _PyType_Lookup(type, s_close_sent);
        if (descr != NULL && Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
            PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
            if (member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED))
                close_sent_offset = member->offset;
        }
    }
    if (close_sent_offset >= 0) {
        PyObject *value = *(PyObject **)((char *)protocol + close_sent_offset);
        if (value == Py_False)
            return 0;
        if (value == Py_True)
            return 1;
        if (value != NULL)
            return PyObject_IsTrue(value);
    }
    PyObject *value = PyObject_GetAttr(protocol, s_close_sent);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

static Py_ssize_t
buffer_size(PyObject *transport)
{
    PyObject *size = call_transport(transport, tm.get_write_buffer_size, s_get_write_buffer_size, NULL);
    if (size == NULL)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    return n;
}

/* Send the frames on the descriptor, one sendmsg for all of them: the bytes sent, 0 on EAGAIN or an
 * error (the transport meets the error again and reports it itself). */
static Py_ssize_t
send_frames(int fd, PyObject **frames, Py_ssize_t n, Py_ssize_t total)
{
    ssize_t sent;
    if (n == 1) {
        sent = send(fd, PyBytes_AS_STRING(frames[0]), (size_t)total, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    else {
        struct iovec iov[64];
        if (n > 64)
            return 0; /* a long burst: the transport takes it whole (64 events for one socket in a turn) */
        for (Py_ssize_t i = 0; i < n; i++) {
            iov[i].iov_base = PyBytes_AS_STRING(frames[i]);
            iov[i].iov_len = (size_t)PyBytes_GET_SIZE(frames[i]);
        }
        struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)n};
        sent = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    return sent < 0 ? 0 : (Py_ssize_t)sent;
}

/* What of the frames is left after ``skip`` bytes, as one new bytes object. */
static PyObject *
rest_of(PyObject **frames, Py_ssize_t n, Py_ssize_t total, Py_ssize_t skip)
{
    if (n == 1 && skip == 0) {
        Py_INCREF(frames[0]);
        return frames[0];
    }
    PyObject *rest = PyBytes_FromStringAndSize(NULL, total - skip);
    if (rest == NULL)
        return NULL;
    char *out = PyBytes_AS_STRING(rest);
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t size = PyBytes_GET_SIZE(frames[i]);
        if (skip >= size) {
            skip -= size;
            continue;
        }
        memcpy(out, PyBytes_AS_STRING(frames[i]) + skip, (size_t)(size - skip));
        out += size - skip;
        skip = 0;
    }
    return rest;
}

/* Write what is pending. 1: fine; 0: the client is slow (over the limit); -1: an exception is set. */
static int
sink_write(FdSink *self)
{
    Py_ssize_t n = self->nframes;
    if (n == 0)
        return 1;
    /* The array is ours for this write: the transport's calls may run Python that pushes again. */
    PyObject **frames = self->frames;
    Py_ssize_t total = self->pending_bytes, cap = self->cap;
    self->frames = NULL;
    self->nframes = self->cap = self->pending_bytes = 0;
    PyObject *transport = self->transport;
    if (Py_TYPE(transport) != tm.type)
        learn_transport(Py_TYPE(transport));
    int result = -1;
    int gone = close_sent(self->protocol);
    if (gone == 0) {
        PyObject *closing = call_transport(transport, tm.is_closing, s_is_closing, NULL);
        gone = closing == NULL ? -1 : PyObject_IsTrue(closing);
        Py_XDECREF(closing);
    }
    if (gone != 0) {
        result = gone < 0 ? -1 : 1;
        goto done;
    }
    Py_ssize_t held = buffer_size(transport);
    if (held < 0)
        goto done;
    Py_ssize_t sent = 0;
    if (held == 0 && self->fd >= 0) {
        sent = send_frames(self->fd, frames, n, total);
        if (sent == total) {
            result = 1;
            goto done;
        }
    }
    PyObject *rest = rest_of(frames, n, total, sent);
    if (rest == NULL)
        goto done;
    PyObject *none = call_transport(transport, tm.write, s_write, rest);
    Py_DECREF(rest);
    if (none == NULL)
        goto done;
    Py_DECREF(none);
    held = buffer_size(transport);
    if (held >= 0)
        result = held > self->limit ? 0 : 1;
done:
    drop_frames(frames, n);
    if (self->frames == NULL) { /* give the array back for the next turn */
        self->frames = frames;
        self->cap = cap;
    }
    else {
        PyMem_Free(frames);
    }
    return result;
}

static PyObject *
sink_flush(FdSink *self, PyObject *Py_UNUSED(ignored))
{
    int ok = sink_write(self);
    if (ok < 0)
        return NULL;
    return PyBool_FromLong(ok);
}

static PyObject *
sink_clear(FdSink *self, PyObject *Py_UNUSED(ignored))
{
    clear_frames(self);
    Py_RETURN_NONE;
}

static PyObject *
sink_get_pending(FdSink *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->pending_bytes);
}

static PyObject *
sink_get_fd(FdSink *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->fd);
}

static PyMethodDef sink_methods[] = {
    {"push", (PyCFunction)sink_push, METH_O,
     "push(frame) -> 0 queued, 1 the first of this turn (mark the sink), 2 over the limit (flush now)"},
    {"flush", (PyCFunction)sink_flush, METH_NOARGS,
     "flush() -> False when the transport now holds more than the limit (a client that stopped reading)"},
    {"clear", (PyCFunction)sink_clear, METH_NOARGS, "clear(): drop what is pending"},
    {NULL},
};

static PyGetSetDef sink_getset[] = {
    {"pending", (getter)sink_get_pending, NULL, "bytes pushed and not written yet", NULL},
    {"fd", (getter)sink_get_fd, NULL, "the socket's file descriptor", NULL},
    {NULL},
};

static PyTypeObject FdSinkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fonana_ws.fanout._sink.FdSink",
    .tp_doc = PyDoc_STR("FdSink(fd, transport, protocol, limit): a socket's pending frames, sent by fd"),
    .tp_basicsize = sizeof(FdSink),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)sink_init,
    .tp_dealloc = (destructor)sink_dealloc,
    .tp_traverse = (traverseproc)sink_traverse,
    .tp_clear = (inquiry)sink_clear_refs,
    .tp_methods = sink_methods,
    .tp_getset = sink_getset,
};

/* flush_all(sinks) -> (slow indices, [(index, exception)]): every sink written, whatever one of them does. */
static PyObject *
flush_all(PyObject *Py_UNUSED(module), PyObject *sinks)
{
    if (!PyList_CheckExact(sinks)) {
        PyErr_SetString(PyExc_TypeError, "sinks is a list");
        return NULL;
    }
    PyObject *slow = PyList_New(0), *failed = PyList_New(0);
    if (slow == NULL || failed == NULL)
        goto error;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(sinks); i++) {
        PyObject *item = PyList_GET_ITEM(sinks, i);
        int ok;
        if (Py_IS_TYPE(item, &FdSinkType)) {
            ok = sink_write((FdSink *)item);
        }
        else {
            Py_INCREF(item);
            PyObject *answer = PyObject_CallMethodNoArgs(item, s_flush);
            Py_DECREF(item);
            ok = answer == NULL ? -1 : PyObject_IsTrue(answer);
            Py_XDECREF(answer);
        }
        if (ok == 1)
            continue;
        PyObject *index = PyLong_FromSsize_t(i);
        if (index == NULL)
            goto error;
        int appended;
        if (ok == 0) {
            appended = PyList_Append(slow, index);
        }
        else {
            if (!PyErr_ExceptionMatches(PyExc_Exception)) { /* KeyboardInterrupt and the like go up */
                Py_DECREF(index);
                goto error;
            }
            PyObject *type, *exc, *tb;
            PyErr_Fetch(&type, &exc, &tb);
            PyErr_NormalizeException(&type, &exc, &tb);
            if (tb != NULL)
                PyException_SetTraceback(exc, tb);
            Py_XDECREF(type);
            Py_XDECREF(tb);
            PyObject *pair = PyTuple_Pack(2, index, exc);
            Py_DECREF(exc);
            appended = pair == NULL ? -1 : PyList_Append(failed, pair);
            Py_XDECREF(pair);
        }
        Py_DECREF(index);
        if (appended < 0)
            goto error;
    }
    PyObject *result = PyTuple_Pack(2, slow, failed);
    Py_DECREF(slow);
    Py_DECREF(failed);
    return result;
error:
    Py_XDECREF(slow);
    Py_XDECREF(failed);
    return NULL;
}

static PyMethodDef module_methods[] = {
    {"flush_all", (PyCFunction)flush_all, METH_O,
     "flush_all(sinks) -> (indices of slow sinks, [(index, exception)] of failed ones)"},
    {NULL},
};

static struct PyModuleDef sink_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fonana_ws.fanout._sink",
    .m_doc = "The direct path's socket writes in C (see fanout/sink.py for the Python reference).",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__sink(void)
{
    if (PyType_Ready(&FdSinkType) < 0)
        return NULL;
    s_close_sent = PyUnicode_InternFromString("close_sent");
    s_is_closing = PyUnicode_InternFromString("is_closing");
    s_get_write_buffer_size = PyUnicode_InternFromString("get_write_buffer_size");
    s_write = PyUnicode_InternFromString("write");
    s_flush = PyUnicode_InternFromString("flush");
    if (!s_close_sent || !s_is_closing || !s_get_write_buffer_size || !s_write || !s_flush)
        return NULL;
    PyObject *module = PyModule_Create(&sink_module);
    if (module == NULL)
        return NULL;
    if (PyModule_AddObjectRef(module, "FdSink", (PyObject *)&FdSinkType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}

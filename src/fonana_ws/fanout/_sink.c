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
#include <sys/socket.h>

typedef struct {
    PyObject_HEAD
    int fd;
    Py_ssize_t limit;
    Py_ssize_t pending_bytes;
    PyObject *transport;
    PyObject *protocol;
    PyObject *pending; /* NULL, one bytes object, or a list of them */
} FdSink;

static PyObject *s_close_sent, *s_is_closing, *s_get_write_buffer_size, *s_write, *s_flush, *s_join, *s_empty;

static int
sink_traverse(FdSink *self, visitproc visit, void *arg)
{
    Py_VISIT(self->transport);
    Py_VISIT(self->protocol);
    Py_VISIT(self->pending);
    return 0;
}

static int
sink_clear_refs(FdSink *self)
{
    Py_CLEAR(self->transport);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->pending);
    return 0;
}

static void
sink_dealloc(FdSink *self)
{
    PyObject_GC_UnTrack(self);
    sink_clear_refs(self);
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
    Py_CLEAR(self->pending);
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
    int first = 0;
    if (self->pending == NULL) {
        Py_INCREF(frame);
        self->pending = frame;
        first = 1;
    }
    else if (PyList_CheckExact(self->pending)) {
        if (PyList_Append(self->pending, frame) < 0)
            return NULL;
    }
    else {
        PyObject *list = PyList_New(2);
        if (list == NULL)
            return NULL;
        PyList_SET_ITEM(list, 0, self->pending); /* steals the pending reference */
        Py_INCREF(frame);
        PyList_SET_ITEM(list, 1, frame);
        self->pending = list;
    }
    self->pending_bytes += PyBytes_GET_SIZE(frame);
    return PyLong_FromLong(self->pending_bytes > self->limit ? 2 : first);
}

/* The pending frames as one bytes object (a new reference), or NULL with pending cleared either way. */
static PyObject *
take_pending(FdSink *self)
{
    PyObject *pending = self->pending;
    self->pending = NULL;
    self->pending_bytes = 0;
    if (pending == NULL || PyBytes_CheckExact(pending))
        return pending;
    PyObject *joined = PyObject_CallMethodOneArg(s_empty, s_join, pending);
    Py_DECREF(pending);
    return joined;
}

static int
truthy_attr(PyObject *obj, PyObject *name)
{
    PyObject *value = PyObject_GetAttr(obj, name);
    if (value == NULL)
        return -1;
    int truth = PyObject_IsTrue(value);
    Py_DECREF(value);
    return truth;
}

static Py_ssize_t
buffer_size(PyObject *transport)
{
    PyObject *size = PyObject_CallMethodNoArgs(transport, s_get_write_buffer_size);
    if (size == NULL)
        return -1;
    Py_ssize_t n = PyLong_AsSsize_t(size);
    Py_DECREF(size);
    return n;
}

/* Write what is pending. 1: fine; 0: the client is slow (over the limit); -1: an exception is set. */
static int
sink_write(FdSink *self)
{
    if (self->pending == NULL)
        return 1;
    PyObject *data = take_pending(self);
    if (data == NULL)
        return -1;
    int result = 1;
    int gone = truthy_attr(self->protocol, s_close_sent);
    if (gone == 0) {
        PyObject *closing = PyObject_CallMethodNoArgs(self->transport, s_is_closing);
        gone = closing == NULL ? -1 : PyObject_IsTrue(closing);
        Py_XDECREF(closing);
    }
    if (gone != 0) {
        Py_DECREF(data);
        return gone < 0 ? -1 : 1;
    }
    Py_ssize_t held = buffer_size(self->transport);
    if (held < 0) {
        Py_DECREF(data);
        return -1;
    }
    Py_ssize_t size = PyBytes_GET_SIZE(data), sent = 0;
    if (held == 0 && self->fd >= 0) {
        sent = send(self->fd, PyBytes_AS_STRING(data), (size_t)size, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent == size) {
            Py_DECREF(data);
            return 1;
        }
        /* EAGAIN, or an error the transport will meet and report itself: it gets everything not sent. */
        if (sent < 0)
            sent = 0;
    }
    PyObject *rest = data;
    if (sent > 0) {
        rest = PyBytes_FromStringAndSize(PyBytes_AS_STRING(data) + sent, size - sent);
        Py_DECREF(data);
        if (rest == NULL)
            return -1;
    }
    PyObject *none = PyObject_CallMethodOneArg(self->transport, s_write, rest);
    Py_DECREF(rest);
    if (none == NULL)
        return -1;
    Py_DECREF(none);
    held = buffer_size(self->transport);
    if (held < 0)
        return -1;
    if (held > self->limit)
        result = 0;
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
    Py_CLEAR(self->pending);
    self->pending_bytes = 0;
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
    s_join = PyUnicode_InternFromString("join");
    s_empty = PyBytes_FromStringAndSize(NULL, 0);
    if (!s_close_sent || !s_is_closing || !s_get_write_buffer_size || !s_write || !s_flush || !s_join || !s_empty)
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

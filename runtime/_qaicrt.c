/* qeff.runtime._qaicrt: a binding to the Cloud AI 100 runtime C API (libQAic.so), loaded at run time.
 *
 * The module imports on any machine: nothing is loaded until a Library object is made. Then the
 * runtime library is dlopen'ed from, in this order, the path given, $QAIC_LIB, or the Platform
 * SDK's default location, and the calls this binding uses are looked up with dlsym.
 *
 *   lib = Library(path=None)                  # dlopen + dlsym; LibraryError names what was tried
 *   session = lib.open(qpc_path, device_id=0) # context, queue, QPC, program (loaded, activated), exec object
 *   session.run(inputs, outputs, timeout=...) # SetDataExt + Enqueue + WaitForCompletion, GIL released
 *   session.close()                           # releases everything in reverse order; a second close does nothing
 *
 * run() takes the buffers in the program's binding order, inputs then outputs. Each is an object
 * with the buffer protocol (a NumPy array, a memoryview, ...) or None. Buffers are passed by
 * pointer, never copied: outputs must be writable and C-contiguous, and the runtime writes into
 * them. Their shape and item size become the QBufferDimensions that select the compiled
 * specialization. None is a zero-size buffer, which for retained state (past_* inputs and their
 * _RetainedState outputs) means "keep it on the device".
 *
 * Every failing status becomes StatusError (with .call and .status); a missing or foreign library
 * becomes LibraryError; a closed or busy session becomes Error. Nothing here should be able to
 * crash the interpreter on bad input.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <dlfcn.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* >>> QAIC C API (inferred) >>>
 *
 * The SDK header QAicApi.h is not public, so these types and prototypes were INFERRED from public
 * callers of libQAic.so (krai/ck-qaic package/lib-qaic-api/QAicInfApi.cpp and other public C++
 * programs that call the C API) and from the public types of the open-source QAic runtime
 * (quic/software-kit-for-qualcomm-cloud-ai-100, qaic-api-common/QAicTypes.h and
 * QAicRuntimeTypes.h). They MUST be checked against /opt/qti-aic/dev/inc/QAicApi.h when an SDK
 * is available; the points least certain are marked "unverified".
 *
 * This block is self-contained C on purpose: the tests extract it (between the two marker lines)
 * into a header that the stand-in libQAic.so includes, so the compiler checks that the stand-in
 * defines exactly these prototypes. This module never calls the declared functions directly: it
 * only takes their types (__typeof__) for the pointers it fills with dlsym.
 */
#include <stddef.h>
#include <stdint.h>

typedef int QStatus; /* an enum in the SDK: QS_SUCCESS = 0, QS_INVAL = 6, QS_DEV_ERROR = 300, QS_ERROR = 500, ... */
typedef int32_t QID; /* a device id */

/* Opaque handles: the runtime allocates them, the caller only passes them back. */
typedef struct QAicContext QAicContext;
typedef struct QAicQueue QAicQueue;
typedef struct QAicQpcObj QAicQpcObj;
typedef struct QAicProgram QAicProgram;
typedef struct QAicExecObj QAicExecObj;
typedef struct QAicEvent QAicEvent;
/* Program properties: a struct whose layout differs between SDK versions (it has devMapping,
 * timeouts, ...). It is only ever filled by qaicProgramPropertiesInitDefault into storage that
 * this module over-allocates (see QAICRT_PROPERTIES_BYTES), never touched field by field. */
typedef struct QAicProgramProperties QAicProgramProperties;
typedef struct QAicQueueProperties QAicQueueProperties; /* always NULL here: the default queue */
typedef uint32_t QAicContextProperties;                 /* a bit field; always NULL here */
typedef uint32_t QAicExecObjProperties;                 /* a bit field */
typedef int QAicProgramActivationCmd;                   /* an enum in the SDK */

#define QAIC_EXECOBJ_PROPERTIES_DEFAULT 0x04u /* AUTO_LOAD_ACTIVATE in the open-source types */
#define QAIC_PROGRAM_CMD_ACTIVATE_FULL 0
#define QAIC_PROGRAM_CMD_DEACTIVATE_FULL 1

/* Callbacks of qaicCreateContext; their signatures are unverified, this module passes NULL. */
typedef void (*QAicLogCallback)(void);
typedef void (*QAicErrorCallback)(void);

/* One inference buffer. size is size_t in the open-source types and in ck-qaic's use
 * (it binds QBuffer::size to a size_t&); handle/offset/type matter only for DMA buffers. */
typedef struct QBuffer {
    size_t size;
    uint8_t *buf;
    uint64_t handle;
    uint32_t offset;
    uint32_t type; /* QBUFFER_TYPE_HEAP = 0 */
} QBuffer;

/* The shape of one buffer: a float32 [2, 4, 8] buffer is {3, 4, {2, 4, 8}}. */
typedef struct QBufferDimensions {
    uint32_t count;
    uint32_t sizeOfElem;
    uint32_t *dims;
} QBufferDimensions;

/* Bytes owned by the runtime, e.g. the program's serialised I/O descriptor (an aicapi.IoDesc protobuf). */
typedef struct QData {
    size_t size;
    uint8_t *data;
} QData;

/* The newest public callers pass 8 arguments (two callbacks, each with user data); an older one
 * passed 7. Unverified. */
QStatus qaicCreateContext(QAicContext **context, const QAicContextProperties *properties, uint32_t numDevices,
                          const QID *devices, QAicLogCallback logCallback, void *logUserData,
                          QAicErrorCallback errorCallback, void *errorUserData);
QStatus qaicReleaseContext(QAicContext *context);
QStatus qaicCreateQueue(QAicContext *context, QAicQueue **queue, const QAicQueueProperties *properties, QID device);
QStatus qaicReleaseQueue(QAicQueue *queue);
QStatus qaicOpenQpcFile(QAicQpcObj **qpc, const char *path);
QStatus qaicCloseQpc(QAicQpcObj *qpc);
QStatus qaicProgramPropertiesInitDefault(QAicProgramProperties *properties);
QStatus qaicCreateProgram(QAicContext *context, QAicProgram **program, const QAicProgramProperties *properties,
                          QID device, const char *name, QAicQpcObj *qpc);
QStatus qaicLoadProgram(QAicProgram *program);
QStatus qaicUnloadProgram(QAicProgram *program);
QStatus qaicRunActivationCmd(QAicProgram *program, QAicProgramActivationCmd command);
QStatus qaicReleaseProgram(QAicProgram *program);
QStatus qaicProgramGetIoDescriptor(QAicProgram *program, QData *ioDescriptor);
/* The last two parameters are DMA-buffer outputs in the public callers, which pass NULL, NULL. Unverified. */
QStatus qaicCreateExecObj(QAicContext *context, QAicExecObj **execObj, const QAicExecObjProperties *properties,
                          QAicProgram *program, const QData *ioDescriptor, void *dmaReserved1, void *dmaReserved2);
QStatus qaicReleaseExecObj(QAicExecObj *execObj);
QStatus qaicExecObjSetDataExt(QAicExecObj *execObj, uint32_t numBuffers, const QBuffer *buffers,
                              const QBufferDimensions *dimensions);
QStatus qaicEnqueueExecObj(QAicQueue *queue, QAicExecObj *execObj, QAicEvent *event);
/* The unit of timeout is unverified: public callers pass 60000000. */
QStatus qaicExecObjWaitForCompletion(QAicExecObj *execObj, uint32_t timeout);
/* <<< QAIC C API (inferred) <<< */

#define QAICRT_DEFAULT_LIBRARY "/opt/qti-aic/dev/lib/x86_64/libQAic.so"
#define QAICRT_DEFAULT_TIMEOUT 60000000u /* what public callers pass to qaicExecObjWaitForCompletion */
#define QAICRT_PROPERTIES_BYTES 4096     /* far more than any known QAicProgramProperties */
#define QAICRT_PROGRAM_NAME "qeff"
#define QAICRT_NO_HANDLE (-1) /* our code: a create call returned success but no handle */
#define QS_SUCCESS 0

/* Every call this module looks up, in the order the session makes them. */
#define QAICRT_CALLS(X)                                                                                 \
    X(qaicCreateContext)                                                                                \
    X(qaicCreateQueue)                                                                                  \
    X(qaicOpenQpcFile)                                                                                  \
    X(qaicProgramPropertiesInitDefault)                                                                 \
    X(qaicCreateProgram)                                                                                \
    X(qaicLoadProgram)                                                                                  \
    X(qaicRunActivationCmd)                                                                             \
    X(qaicProgramGetIoDescriptor)                                                                       \
    X(qaicCreateExecObj)                                                                                \
    X(qaicExecObjSetDataExt)                                                                            \
    X(qaicEnqueueExecObj)                                                                               \
    X(qaicExecObjWaitForCompletion)                                                                     \
    X(qaicReleaseExecObj)                                                                               \
    X(qaicUnloadProgram)                                                                                \
    X(qaicReleaseProgram)                                                                               \
    X(qaicCloseQpc)                                                                                     \
    X(qaicReleaseQueue)                                                                                 \
    X(qaicReleaseContext)

/* The function table: one pointer per call, typed from the prototype above. */
typedef struct {
#define QAICRT_FIELD(name) __typeof__(name) *name;
    QAICRT_CALLS(QAICRT_FIELD)
#undef QAICRT_FIELD
} QaicApi;

static PyObject *Error;        /* base: closed session, busy session */
static PyObject *LibraryError; /* the library cannot be loaded or lacks a call */
static PyObject *StatusError;  /* a call returned a failing status */

/* ------------------------------------------------------------------------------------------------
 * Errors
 * --------------------------------------------------------------------------------------------- */

static const char *status_name(QStatus status)
{
    switch (status) { /* the public QStatus enum (open-source QAicTypes.h) */
    case 0: return "QS_SUCCESS";
    case 1: return "QS_PERM";
    case 2: return "QS_AGAIN";
    case 3: return "QS_NOMEM";
    case 4: return "QS_BUSY";
    case 5: return "QS_NODEV";
    case 6: return "QS_INVAL";
    case 7: return "QS_NOSPC";
    case 8: return "QS_BADFD";
    case 9: return "QS_TIMEDOUT";
    case 10: return "QS_PROTOCOL";
    case 11: return "QS_UNSUPPORTED";
    case 12: return "QS_DATA_CRC_ERROR";
    case 300: return "QS_DEV_ERROR";
    case 500: return "QS_ERROR";
    case QAICRT_NO_HANDLE: return "success, but no handle was returned";
    default: return "unknown status";
    }
}

/* Raise StatusError("<call> failed with status N (NAME) <context>") with .call and .status set. */
static PyObject *raise_status(const char *call, QStatus status, const char *context)
{
    PyObject *message = PyUnicode_FromFormat("%s failed with status %d (%s) %s", call, status,
                                             status_name(status), context);
    if (message == NULL)
        return NULL;
    PyObject *exc = PyObject_CallOneArg(StatusError, message);
    Py_DECREF(message);
    if (exc == NULL)
        return NULL;
    PyObject *call_text = PyUnicode_FromString(call);
    PyObject *status_number = PyLong_FromLong(status);
    if (call_text != NULL && status_number != NULL && PyObject_SetAttrString(exc, "call", call_text) == 0 &&
        PyObject_SetAttrString(exc, "status", status_number) == 0)
        PyErr_SetObject(StatusError, exc);
    Py_XDECREF(call_text);
    Py_XDECREF(status_number);
    Py_DECREF(exc);
    return NULL;
}

/* ------------------------------------------------------------------------------------------------
 * Library: the dlopen'ed runtime and its function table
 * --------------------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    void *handle;
    PyObject *path; /* str: the path given to dlopen */
    QaicApi api;
} LibraryObject;

static PyTypeObject LibraryType;
static PyTypeObject SessionType;

/* The path to load and where it came from: the argument, else $QAIC_LIB, else the default.
 * An explicit choice that fails is an error, never a silent fall-back to another library. */
static PyObject *choose_library_path(PyObject *arg, const char **source)
{
    if (arg != NULL && arg != Py_None) {
        *source = "the lib argument";
        PyObject *encoded = NULL;
        if (!PyUnicode_FSConverter(arg, &encoded))
            return NULL;
        return encoded;
    }
    const char *env = getenv("QAIC_LIB");
    if (env != NULL && env[0] != '\0') {
        *source = "$QAIC_LIB";
        return PyBytes_FromString(env);
    }
    *source = "the SDK's default location";
    return PyBytes_FromString(QAICRT_DEFAULT_LIBRARY);
}

static int bind_calls(LibraryObject *self, const char *path)
{
    /* The POSIX idiom for storing a dlsym result in a function pointer. */
#define QAICRT_BIND(name)                                                                               \
    *(void **)(&self->api.name) = dlsym(self->handle, #name);                                           \
    if (self->api.name == NULL) {                                                                       \
        PyErr_Format(LibraryError,                                                                      \
                     "%s loaded, but it has no %s: it is not a Cloud AI runtime library this binding "  \
                     "knows (use libQAic.so from the Cloud AI Platform SDK)",                           \
                     path, #name);                                                                      \
        return -1;                                                                                      \
    }
    QAICRT_CALLS(QAICRT_BIND)
#undef QAICRT_BIND
    return 0;
}

static PyObject *Library_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"path", NULL};
    PyObject *arg = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|O:Library", keywords, &arg))
        return NULL;
    const char *source = NULL;
    PyObject *encoded = choose_library_path(arg, &source);
    if (encoded == NULL)
        return NULL;
    const char *path = PyBytes_AS_STRING(encoded);
    /* RTLD_NOW: a library with missing dependencies fails here, not in the middle of a run. The
     * handle is never dlclose'd: the runtime may own threads, and dlopen counts references. */
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) {
        const char *reason = dlerror();
        PyErr_Format(LibraryError,
                     "cannot load the Cloud AI runtime library: tried %s (from %s): %s. The lookup order is "
                     "the lib argument, then $QAIC_LIB, then %s",
                     path, source, reason ? reason : "unknown error", QAICRT_DEFAULT_LIBRARY);
        Py_DECREF(encoded);
        return NULL;
    }
    LibraryObject *self = (LibraryObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    self->handle = handle;
    self->path = PyUnicode_DecodeFSDefault(path);
    if (self->path == NULL || bind_calls(self, path) < 0) {
        Py_DECREF(encoded);
        Py_DECREF(self);
        return NULL;
    }
    Py_DECREF(encoded);
    return (PyObject *)self;
}

static void Library_dealloc(LibraryObject *self)
{
    Py_XDECREF(self->path);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Library_repr(LibraryObject *self)
{
    return PyUnicode_FromFormat("<_qaicrt.Library %R>", self->path);
}

/* ------------------------------------------------------------------------------------------------
 * Session: one loaded, activated program with one queue and one exec object
 * --------------------------------------------------------------------------------------------- */

/* Everything the runtime handed out, so that teardown releases exactly what exists. */
typedef struct {
    QAicContext *context;
    QAicQueue *queue;
    QAicQpcObj *qpc;
    QAicProgram *program;
    QAicExecObj *exec;
    int loaded;
    int active;
    QData io_descriptor;
    /* Storage for QAicProgramProperties, kept for the program's lifetime in case the runtime
     * keeps pointers into it (devMapping is a pointer field). */
    _Alignas(16) unsigned char program_properties[QAICRT_PROPERTIES_BYTES];
} Handles;

typedef struct {
    PyObject_HEAD
    LibraryObject *library; /* strong reference: the function table must outlive the handles */
    PyObject *qpc_path;     /* str */
    QID device;
    int closed;
    int busy; /* a run or close is in progress with the GIL released */
    Handles handles;
} SessionObject;

/* Open everything, in the order of the public callers. Runs without the GIL: plain C only.
 * On failure, *failed names the call; the caller tears down whatever was created. */
static QStatus open_program(const QaicApi *api, Handles *h, const char *qpc_path, QID device, const char **failed)
{
    QStatus status;
#define QAICRT_STEP(call, expr)                                                                         \
    do {                                                                                                \
        status = (expr);                                                                                \
        if (status != QS_SUCCESS) {                                                                     \
            *failed = call;                                                                             \
            return status;                                                                              \
        }                                                                                               \
    } while (0)
    /* Each handle goes to a local first: a failing create call may leave garbage in its output. */
#define QAICRT_CREATE(call, slot, local, expr)                                                          \
    do {                                                                                                \
        QAICRT_STEP(call, expr);                                                                        \
        if (local == NULL) {                                                                            \
            *failed = call;                                                                             \
            return QAICRT_NO_HANDLE;                                                                    \
        }                                                                                               \
        slot = local;                                                                                   \
    } while (0)
    QAicContext *context = NULL;
    QAicQueue *queue = NULL;
    QAicQpcObj *qpc = NULL;
    QAicProgram *program = NULL;
    QAicExecObj *exec = NULL;
    QAicExecObjProperties exec_properties = QAIC_EXECOBJ_PROPERTIES_DEFAULT;
    QAicProgramProperties *properties = (QAicProgramProperties *)h->program_properties;

    QAICRT_CREATE("qaicCreateContext", h->context, context,
                  api->qaicCreateContext(&context, NULL, 1, &device, NULL, NULL, NULL, NULL));
    QAICRT_CREATE("qaicCreateQueue", h->queue, queue, api->qaicCreateQueue(h->context, &queue, NULL, device));
    QAICRT_CREATE("qaicOpenQpcFile", h->qpc, qpc, api->qaicOpenQpcFile(&qpc, qpc_path));
    memset(h->program_properties, 0, sizeof h->program_properties);
    QAICRT_STEP("qaicProgramPropertiesInitDefault", api->qaicProgramPropertiesInitDefault(properties));
    QAICRT_CREATE("qaicCreateProgram", h->program, program,
                  api->qaicCreateProgram(h->context, &program, properties, device, QAICRT_PROGRAM_NAME, h->qpc));
    QAICRT_STEP("qaicLoadProgram", api->qaicLoadProgram(h->program));
    h->loaded = 1;
    QAICRT_STEP("qaicRunActivationCmd", api->qaicRunActivationCmd(h->program, QAIC_PROGRAM_CMD_ACTIVATE_FULL));
    h->active = 1;
    QData descriptor = {0, NULL};
    QAICRT_STEP("qaicProgramGetIoDescriptor", api->qaicProgramGetIoDescriptor(h->program, &descriptor));
    h->io_descriptor = descriptor;
    QAICRT_CREATE("qaicCreateExecObj", h->exec, exec,
                  api->qaicCreateExecObj(h->context, &exec, &exec_properties, h->program,
                                         descriptor.data != NULL ? &h->io_descriptor : NULL, NULL, NULL));
#undef QAICRT_CREATE
#undef QAICRT_STEP
    return QS_SUCCESS;
}

/* Release everything in reverse order; every step runs even after a failure, the first failure
 * is reported. Runs without the GIL. Leaves the handles empty, so it is safe to call twice. */
static QStatus close_program(const QaicApi *api, Handles *h, const char **failed)
{
    QStatus first = QS_SUCCESS, status;
#define QAICRT_RELEASE(call, expr)                                                                      \
    do {                                                                                                \
        status = (expr);                                                                                \
        if (status != QS_SUCCESS && first == QS_SUCCESS) {                                              \
            first = status;                                                                             \
            *failed = call;                                                                             \
        }                                                                                               \
    } while (0)
    if (h->exec != NULL)
        QAICRT_RELEASE("qaicReleaseExecObj", api->qaicReleaseExecObj(h->exec));
    if (h->active)
        QAICRT_RELEASE("qaicRunActivationCmd", api->qaicRunActivationCmd(h->program, QAIC_PROGRAM_CMD_DEACTIVATE_FULL));
    if (h->loaded)
        QAICRT_RELEASE("qaicUnloadProgram", api->qaicUnloadProgram(h->program));
    if (h->program != NULL)
        QAICRT_RELEASE("qaicReleaseProgram", api->qaicReleaseProgram(h->program));
    if (h->qpc != NULL)
        QAICRT_RELEASE("qaicCloseQpc", api->qaicCloseQpc(h->qpc));
    if (h->queue != NULL)
        QAICRT_RELEASE("qaicReleaseQueue", api->qaicReleaseQueue(h->queue));
    if (h->context != NULL)
        QAICRT_RELEASE("qaicReleaseContext", api->qaicReleaseContext(h->context));
#undef QAICRT_RELEASE
    h->exec = NULL;
    h->program = NULL;
    h->qpc = NULL;
    h->queue = NULL;
    h->context = NULL;
    h->active = h->loaded = 0;
    h->io_descriptor.data = NULL;
    h->io_descriptor.size = 0;
    return first;
}

static PyObject *Library_open(LibraryObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"qpc_path", "device_id", NULL};
    PyObject *encoded = NULL;
    int device = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O&|i:open", keywords, PyUnicode_FSConverter, &encoded, &device))
        return NULL;
    if (device < 0) {
        Py_DECREF(encoded);
        return PyErr_Format(PyExc_ValueError, "device_id must be 0 or more, got %d", device);
    }
    SessionObject *session = PyObject_New(SessionObject, &SessionType);
    if (session == NULL) {
        Py_DECREF(encoded);
        return NULL;
    }
    memset(&session->handles, 0, sizeof session->handles);
    session->closed = 1; /* until open succeeds: dealloc then has nothing to release */
    session->busy = 0;
    session->device = device;
    Py_INCREF(self);
    session->library = self;
    session->qpc_path = PyUnicode_DecodeFSDefault(PyBytes_AS_STRING(encoded));
    if (session->qpc_path == NULL) {
        Py_DECREF(encoded);
        Py_DECREF(session);
        return NULL;
    }
    const char *failed = NULL, *ignored = NULL;
    const char *path = PyBytes_AS_STRING(encoded);
    QStatus status;
    Py_BEGIN_ALLOW_THREADS
    status = open_program(&self->api, &session->handles, path, (QID)device, &failed);
    if (status != QS_SUCCESS)
        close_program(&self->api, &session->handles, &ignored); /* the first failure is the one to report */
    Py_END_ALLOW_THREADS
    if (status != QS_SUCCESS) {
        char context[1024]; /* a very long path is cut short, the call and status stay */
        snprintf(context, sizeof context, "while opening %s on device %d", path, device);
        raise_status(failed, status, context);
        Py_DECREF(encoded);
        Py_DECREF(session);
        return NULL;
    }
    Py_DECREF(encoded);
    session->closed = 0;
    return (PyObject *)session;
}

static int check_usable(SessionObject *self)
{
    if (self->closed) {
        PyErr_SetString(Error, "the session is closed: open a new one");
        return -1;
    }
    if (self->busy) {
        PyErr_SetString(Error, "the session is busy in another thread: a session runs one call at a time");
        return -1;
    }
    return 0;
}

/* The buffers of one run: the Py_buffer views that pin the caller's memory, and the QBuffer and
 * QBufferDimensions arrays that point into them. */
typedef struct {
    Py_ssize_t count;
    Py_buffer *views;
    char *acquired; /* views[i] holds a buffer that must be released */
    QBuffer *buffers;
    QBufferDimensions *dimensions;
    uint32_t *dims; /* PyBUF_MAX_NDIM per buffer */
} Marshalled;

static void marshalled_free(Marshalled *m)
{
    for (Py_ssize_t i = 0; i < m->count; i++)
        if (m->acquired != NULL && m->acquired[i])
            PyBuffer_Release(&m->views[i]);
    PyMem_Free(m->views);
    PyMem_Free(m->acquired);
    PyMem_Free(m->buffers);
    PyMem_Free(m->dimensions);
    PyMem_Free(m->dims);
}

static int marshalled_alloc(Marshalled *m, Py_ssize_t count)
{
    memset(m, 0, sizeof *m);
    size_t n = count > 0 ? (size_t)count : 1;
    m->count = count;
    m->views = PyMem_Calloc(n, sizeof *m->views);
    m->acquired = PyMem_Calloc(n, 1);
    m->buffers = PyMem_Calloc(n, sizeof *m->buffers);
    m->dimensions = PyMem_Calloc(n, sizeof *m->dimensions);
    m->dims = PyMem_Calloc(n * PyBUF_MAX_NDIM, sizeof *m->dims);
    if (m->views == NULL || m->acquired == NULL || m->buffers == NULL || m->dimensions == NULL || m->dims == NULL) {
        m->count = 0;
        marshalled_free(m);
        memset(m, 0, sizeof *m); /* the caller frees m again on every failure */
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* Point buffer i at `object` (None: zero size, dims [0]) without copying its memory. */
static int marshal_one(Marshalled *m, Py_ssize_t i, PyObject *object, int writable, const char *role, Py_ssize_t index)
{
    QBuffer *buffer = &m->buffers[i];
    QBufferDimensions *dimensions = &m->dimensions[i];
    uint32_t *dims = &m->dims[i * PyBUF_MAX_NDIM];
    dimensions->dims = dims;
    buffer->type = 0; /* heap memory */
    if (object == Py_None) {
        /* Zero size: for retained state the runtime keeps (or keeps writing) it on the device. */
        dimensions->count = 1;
        dimensions->sizeOfElem = 1;
        dims[0] = 0;
        return 0;
    }
    Py_buffer *view = &m->views[i];
    int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(object, view, flags) < 0) {
        /* Say which buffer it was, keeping the exporter's reason (not writable, not contiguous, ...). */
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        PyErr_NormalizeException(&type, &value, &traceback);
        PyErr_Format(PyExc_TypeError, "%s %zd must be a %sC-contiguous buffer (a NumPy array) or None, got %.100s: %S",
                     role, index, writable ? "writable " : "", Py_TYPE(object)->tp_name,
                     value != NULL ? value : Py_None);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(traceback);
        return -1;
    }
    m->acquired[i] = 1;
    /* Each buffer has room for PyBUF_MAX_NDIM dims (the last one's end where the allocation ends),
     * but an exporter is free to report more: ctypes arrays nest without limit. */
    if (view->ndim < 0 || view->ndim > PyBUF_MAX_NDIM) {
        PyErr_Format(PyExc_ValueError, "%s %zd has %d dimensions, more than the %d a buffer may have", role, index,
                     view->ndim, PyBUF_MAX_NDIM);
        return -1;
    }
    if (view->itemsize <= 0 || (uint64_t)view->itemsize > UINT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s %zd has an item size of %zd bytes", role, index, view->itemsize);
        return -1;
    }
    dimensions->sizeOfElem = (uint32_t)view->itemsize;
    dimensions->count = (uint32_t)view->ndim;
    for (int d = 0; d < view->ndim; d++) {
        if (view->shape[d] < 0 || (uint64_t)view->shape[d] > UINT32_MAX) {
            PyErr_Format(PyExc_ValueError, "%s %zd has dim %d = %zd, beyond what the runtime takes (uint32)", role,
                         index, d, view->shape[d]);
            return -1;
        }
        dims[d] = (uint32_t)view->shape[d];
    }
    buffer->size = (size_t)view->len;
    buffer->buf = (uint8_t *)view->buf;
    return 0;
}

static int marshal_all(Marshalled *m, PyObject *inputs, PyObject *outputs)
{
    Py_ssize_t n_inputs = PySequence_Fast_GET_SIZE(inputs);
    Py_ssize_t n_outputs = PySequence_Fast_GET_SIZE(outputs);
    if (n_inputs > (Py_ssize_t)(UINT32_MAX / 2) || n_outputs > (Py_ssize_t)(UINT32_MAX / 2)) {
        PyErr_SetString(PyExc_ValueError, "too many buffers");
        return -1;
    }
    if (marshalled_alloc(m, n_inputs + n_outputs) < 0)
        return -1;
    for (Py_ssize_t i = 0; i < n_inputs; i++)
        if (marshal_one(m, i, PySequence_Fast_GET_ITEM(inputs, i), 0, "input", i) < 0)
            return -1;
    for (Py_ssize_t i = 0; i < n_outputs; i++)
        if (marshal_one(m, n_inputs + i, PySequence_Fast_GET_ITEM(outputs, i), 1, "output", i) < 0)
            return -1;
    return 0;
}

static int parse_timeout(PyObject *object, uint32_t *timeout)
{
    if (object == NULL || object == Py_None) {
        *timeout = QAICRT_DEFAULT_TIMEOUT;
        return 0;
    }
    unsigned long long value = PyLong_AsUnsignedLongLong(object);
    if (PyErr_Occurred() || value > UINT32_MAX) {
        PyErr_Clear();
        PyErr_SetString(PyExc_ValueError, "timeout must be an int from 0 to 2**32 - 1");
        return -1;
    }
    *timeout = (uint32_t)value;
    return 0;
}

PyDoc_STRVAR(Session_run_doc,
             "run(inputs, outputs, *, timeout=None)\n--\n\n"
             "Run once. inputs and outputs are sequences, in the program's binding order, of C-contiguous\n"
             "buffers (outputs writable) or None (a zero-size buffer: retained state stays on the device).\n"
             "The runtime reads and writes them in place. timeout goes to qaicExecObjWaitForCompletion.");

/* SetDataExt + Enqueue + WaitForCompletion on marshalled buffers, without the GIL. */
static QStatus run_program(const QaicApi *api, Handles *h, Marshalled *m, uint32_t timeout, const char **failed)
{
    *failed = "qaicExecObjSetDataExt";
    QStatus status = api->qaicExecObjSetDataExt(h->exec, (uint32_t)m->count, m->buffers, m->dimensions);
    if (status != QS_SUCCESS)
        return status;
    *failed = "qaicEnqueueExecObj";
    status = api->qaicEnqueueExecObj(h->queue, h->exec, NULL);
    if (status != QS_SUCCESS)
        return status;
    *failed = "qaicExecObjWaitForCompletion";
    return api->qaicExecObjWaitForCompletion(h->exec, timeout);
}

static PyObject *Session_run(SessionObject *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"inputs", "outputs", "timeout", NULL};
    PyObject *inputs_arg, *outputs_arg, *timeout_arg = NULL;
    uint32_t timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O:run", keywords, &inputs_arg, &outputs_arg, &timeout_arg))
        return NULL;
    if (check_usable(self) < 0 || parse_timeout(timeout_arg, &timeout) < 0)
        return NULL;
    /* busy from here on: reading the sequences can run Python code (and so other threads), and
     * the runtime uses the handles without the GIL; close() refuses while it is set. */
    self->busy = 1;
    Marshalled m;
    memset(&m, 0, sizeof m);
    PyObject *inputs = PySequence_Fast(inputs_arg, "inputs must be a sequence of buffers");
    PyObject *outputs = inputs ? PySequence_Fast(outputs_arg, "outputs must be a sequence of buffers") : NULL;
    int marshalled = outputs != NULL ? marshal_all(&m, inputs, outputs) : -1;
    /* The views hold their own references to the buffers' owners: the sequences may go now. */
    Py_XDECREF(inputs);
    Py_XDECREF(outputs);
    if (marshalled < 0) {
        self->busy = 0;
        marshalled_free(&m);
        return NULL;
    }
    const QaicApi *api = &self->library->api;
    const char *failed = NULL;
    QStatus status;
    /* The views keep the buffers' memory in place while the GIL is released: an object with
     * exported buffers (a NumPy array, a bytearray) refuses to be resized or freed. */
    Py_BEGIN_ALLOW_THREADS
    status = run_program(api, &self->handles, &m, timeout, &failed);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    /* The exec object keeps the buffer pointers until the next SetData, but the runtime only
     * reads them between Enqueue and completion, which is over: the views can be released. */
    marshalled_free(&m);
    if (status != QS_SUCCESS)
        return raise_status(failed, status, "while running the program (the inputs and outputs are as passed)");
    Py_RETURN_NONE;
}

PyDoc_STRVAR(Session_close_doc,
             "close()\n--\n\n"
             "Release the exec object, deactivate, unload and release the program, close the QPC, release\n"
             "the queue and the context. The session is closed even when a release call fails (that\n"
             "failure is raised after all of them ran). Closing a closed session does nothing.");

static PyObject *Session_close(SessionObject *self, PyObject *Py_UNUSED(ignored))
{
    if (self->closed)
        Py_RETURN_NONE;
    if (check_usable(self) < 0)
        return NULL;
    const char *failed = NULL;
    QStatus status;
    self->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    status = close_program(&self->library->api, &self->handles, &failed);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    self->closed = 1;
    if (status != QS_SUCCESS)
        return raise_status(failed, status, "while closing the session (its handles were dropped)");
    Py_RETURN_NONE;
}

static void Session_dealloc(SessionObject *self)
{
    if (!self->closed && self->library != NULL) {
        /* Not closed by its owner: release quietly (failures cannot be reported from here). The
         * release calls can block on the device, so other threads run meanwhile; nothing else can
         * reach this object any more, and the calls only touch the handles and the function table
         * (kept alive by self->library until after them), never a Python object. */
        const QaicApi *api = &self->library->api;
        Handles *handles = &self->handles;
        const char *ignored = NULL;
        Py_BEGIN_ALLOW_THREADS
        close_program(api, handles, &ignored);
        Py_END_ALLOW_THREADS
        self->closed = 1;
    }
    Py_XDECREF(self->qpc_path);
    Py_XDECREF(self->library); /* after the release calls, which use its function table */
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Session_get_closed(SessionObject *self, void *Py_UNUSED(closure))
{
    return PyBool_FromLong(self->closed);
}

static PyObject *Session_get_io_descriptor(SessionObject *self, void *Py_UNUSED(closure))
{
    if (check_usable(self) < 0)
        return NULL;
    const QData *d = &self->handles.io_descriptor;
    if (d->data == NULL || d->size > (size_t)PY_SSIZE_T_MAX)
        return PyBytes_FromStringAndSize("", 0);
    return PyBytes_FromStringAndSize((const char *)d->data, (Py_ssize_t)d->size);
}

static PyObject *Session_repr(SessionObject *self)
{
    return PyUnicode_FromFormat("<_qaicrt.Session %R on device %d%s>", self->qpc_path, (int)self->device,
                                self->closed ? ", closed" : "");
}

static PyMethodDef Session_methods[] = {
    {"run", (PyCFunction)(void (*)(void))Session_run, METH_VARARGS | METH_KEYWORDS, Session_run_doc},
    {"close", (PyCFunction)Session_close, METH_NOARGS, Session_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *Session_get_qpc_path(SessionObject *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->qpc_path);
    return self->qpc_path;
}

static PyObject *Session_get_device_id(SessionObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromLong(self->device);
}

static PyGetSetDef Session_getset[] = {
    {"closed", (getter)Session_get_closed, NULL, "True once close() ran (or opening failed).", NULL},
    {"io_descriptor", (getter)Session_get_io_descriptor, NULL,
     "The program's serialised I/O descriptor (qaicProgramGetIoDescriptor), as bytes.", NULL},
    {"qpc_path", (getter)Session_get_qpc_path, NULL, "The programqpc.bin this session opened.", NULL},
    {"device_id", (getter)Session_get_device_id, NULL, "The device (QID) the program runs on.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Library_open_doc,
             "open(qpc_path, device_id=0)\n--\n\n"
             "Create a context and a queue on the device, open the QPC, create, load and activate its\n"
             "program and create an exec object. Returns a Session; raises StatusError naming the call\n"
             "that failed (everything created before it is released).");

static PyMethodDef Library_methods[] = {
    {"open", (PyCFunction)(void (*)(void))Library_open, METH_VARARGS | METH_KEYWORDS, Library_open_doc},
    {NULL, NULL, 0, NULL},
};

static PyObject *Library_get_path(LibraryObject *self, void *Py_UNUSED(closure))
{
    Py_INCREF(self->path);
    return self->path;
}

static PyGetSetDef Library_getset[] = {
    {"path", (getter)Library_get_path, NULL, "The path the library was loaded from.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(Library_doc,
             "Library(path=None)\n--\n\n"
             "The Cloud AI runtime library, dlopen'ed from path, else $QAIC_LIB, else\n" QAICRT_DEFAULT_LIBRARY
             ".\nRaises LibraryError naming the path tried when it cannot be loaded or lacks a call.");

static PyTypeObject LibraryType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qeff.runtime._qaicrt.Library",
    .tp_basicsize = sizeof(LibraryObject),
    .tp_dealloc = (destructor)Library_dealloc,
    .tp_repr = (reprfunc)Library_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = Library_doc,
    .tp_methods = Library_methods,
    .tp_getset = Library_getset,
    .tp_new = Library_new,
};

/* Session has no tp_new: sessions come from Library.open only. */
static PyTypeObject SessionType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "qeff.runtime._qaicrt.Session",
    .tp_basicsize = sizeof(SessionObject),
    .tp_dealloc = (destructor)Session_dealloc,
    .tp_repr = (reprfunc)Session_repr,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A program loaded and activated on a device; made by Library.open().",
    .tp_methods = Session_methods,
    .tp_getset = Session_getset,
};

/* ------------------------------------------------------------------------------------------------
 * Module
 * --------------------------------------------------------------------------------------------- */

/* CALLS: the names of the calls this module binds, for documentation and tests. */
static int add_calls(PyObject *module)
{
    static const char *names[] = {
#define QAICRT_NAME(name) #name,
        QAICRT_CALLS(QAICRT_NAME)
#undef QAICRT_NAME
    };
    Py_ssize_t count = (Py_ssize_t)(sizeof names / sizeof names[0]);
    PyObject *calls = PyTuple_New(count);
    if (calls == NULL)
        return -1;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name = PyUnicode_FromString(names[i]);
        if (name == NULL) {
            Py_DECREF(calls);
            return -1;
        }
        PyTuple_SET_ITEM(calls, i, name);
    }
    if (PyModule_AddObject(module, "CALLS", calls) < 0) {
        Py_DECREF(calls);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(module_doc,
             "Binding to the Cloud AI 100 runtime C API (libQAic.so), dlopen'ed at first use.\n\n"
             "Library(path=None).open(qpc_path, device_id=0) -> Session; Session.run(inputs, outputs);\n"
             "Session.close(). Errors: Error (closed or busy session), LibraryError (cannot load),\n"
             "StatusError (a call failed; .call and .status).");

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qaicrt", module_doc, -1, NULL, NULL, NULL, NULL, NULL};

static PyObject *new_exception(PyObject *module, const char *name, PyObject *base, const char *doc)
{
    char qualified[96];
    snprintf(qualified, sizeof qualified, "qeff.runtime._qaicrt.%s", name);
    PyObject *type = PyErr_NewExceptionWithDoc(qualified, doc, base, NULL);
    if (type == NULL)
        return NULL;
    Py_INCREF(type); /* one reference for the module, one for the static pointer */
    if (PyModule_AddObject(module, name, type) < 0) {
        Py_DECREF(type);
        Py_DECREF(type);
        return NULL;
    }
    return type;
}

PyMODINIT_FUNC PyInit__qaicrt(void)
{
    if (PyType_Ready(&LibraryType) < 0 || PyType_Ready(&SessionType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Error = new_exception(m, "Error", PyExc_RuntimeError, "A Cloud AI runtime error.");
    if (Error == NULL)
        goto fail;
    LibraryError = new_exception(m, "LibraryError", Error, "libQAic.so cannot be loaded, or lacks a call.");
    StatusError = new_exception(m, "StatusError", Error, "A runtime call failed; .call and .status say which and how.");
    if (LibraryError == NULL || StatusError == NULL)
        goto fail;
    Py_INCREF(&LibraryType);
    if (PyModule_AddObject(m, "Library", (PyObject *)&LibraryType) < 0) {
        Py_DECREF(&LibraryType);
        goto fail;
    }
    Py_INCREF(&SessionType);
    if (PyModule_AddObject(m, "Session", (PyObject *)&SessionType) < 0) {
        Py_DECREF(&SessionType);
        goto fail;
    }
    if (PyModule_AddStringConstant(m, "DEFAULT_LIBRARY", QAICRT_DEFAULT_LIBRARY) < 0 ||
        PyModule_AddIntConstant(m, "DEFAULT_TIMEOUT", (long)QAICRT_DEFAULT_TIMEOUT) < 0 || add_calls(m) < 0)
        goto fail;
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}

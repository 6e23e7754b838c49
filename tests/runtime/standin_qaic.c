/* A stand-in libQAic.so for the tests of qeff.runtime._qaicrt (no Cloud AI card or SDK needed).
 *
 * It defines the calls the binding uses with exactly the binding's prototypes: the tests extract
 * the "QAIC C API (inferred)" block from runtime/_qaicrt.c into qaic_api.h, which this file
 * includes, so a prototype that drifts is a compile error here.
 *
 * The "QPC" is a text file (the tests write it; see aic_helpers.write_standin_qpc):
 *
 *     QEFF-STANDIN-QPC 1
 *     symbols 3 batch_size seq_len ctx_len
 *     specs 2
 *     1 32 32
 *     1 1 32
 *     bindings 11
 *     in input_ids 8 2 batch_size seq_len
 *     in past_key.0 2 4 batch_size 2 ctx_len 16
 *     out logits 4 3 batch_size 1 512
 *     out past_key.0_RetainedState 2 4 batch_size 2 ctx_len 16
 *     ...
 *
 * i.e. the compiled specializations and the bindings in buffer order (direction, name, element
 * size, rank, dims as numbers or symbols). Its text is also the "I/O descriptor".
 *
 * The "program" (all values are small integers, so float32/float16 arithmetic is exact):
 *   1. a past_* input with a non-zero buffer replaces that retained buffer on the "device";
 *      a zero-size one keeps it (the SDK rule for retained state);
 *   2. retained buffer k (in binding order), shape [B, H, C, D]: for each batch row b and token t
 *      with 0 <= p = position_ids[b, t] < C, state_k[b, :, p, :] = input_ids[b, t] + k;
 *   3. logits[b, l, v] = sum over k of sum(state_k[b]) + (v % 7) * (last + 1) + last_id, where
 *      last is the largest position in row b (-1 if none is >= 0) and last_id the input id at
 *      its first occurrence (0 if none);
 *   4. a _RetainedState output with a non-zero buffer receives a copy of the updated state.
 * Retained buffers start zeroed when the program is loaded and persist between runs.
 *
 * It validates what a real runtime would: handles, call order (load before activate, deactivate
 * before unload, ...), buffer count, element sizes, sizes against dims, zero-size buffers only
 * for retained state (SetDataExt: QS_INVAL), and dims that match no compiled specialization
 * (QS_DEV_ERROR at completion, as the real runtime reports "No matching specialization found").
 *
 * Test hooks:
 *   QAIC_STANDIN_FAIL=<call>[=<status>]  that call returns <status> (default 500, QS_ERROR)
 *   QAIC_STANDIN_DEVICES=<n>             devices 0..n-1 exist (default 1)
 *   QAIC_STANDIN_SLEEP_MS=<ms>           qaicExecObjWaitForCompletion sleeps first (a slow device)
 *   QAIC_STANDIN_RELEASE_SLEEP_MS=<ms>   qaicReleaseContext sleeps first (a device slow to let go)
 *   qaicStandinCounter(name)             "live" (objects not yet released), "runs",
 *                                        "retained_bytes_in", "retained_bytes_out" (last run)
 */
#define _POSIX_C_SOURCE 200809L /* nanosleep */
#include "qaic_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { QS_OK = 0, QS_BUSY = 4, QS_NODEV = 5, QS_INVAL = 6, QS_NOMEM = 3, QS_UNSUPPORTED = 11,
       QS_DEV_ERROR = 300, QS_ERROR = 500 };

#define MAX_NAME 128
#define MAX_RANK 8
#define MAX_SYMBOLS 16
#define MAX_SPECS 16
#define MAX_BINDINGS 256
#define MAGIC_CONTEXT 0xC0C0u
#define MAGIC_QUEUE 0x9E9Eu
#define MAGIC_QPC 0x0BC0u
#define MAGIC_PROGRAM 0x9A0Au
#define MAGIC_EXEC 0xE0E0u
#define MAGIC_PROPERTIES 0x5EEDu

long long qaicStandinCounter(const char *name);

static long long live_objects, runs, retained_bytes_in, retained_bytes_out;

/* ---------------------------------------------------------------------------------------------
 * Objects
 * ------------------------------------------------------------------------------------------ */

typedef struct {
    char name[MAX_NAME];
    int is_output;
    uint32_t elem;
    uint32_t rank;
    long long dim[MAX_RANK]; /* >= 0: a fixed size; < 0: symbol -(dim + 1) */
    int partner;             /* a retained input: its _RetainedState output (and back); else -1 */
} Binding;

struct QAicContext {
    unsigned magic;
    QID device;
    int children; /* queues, programs and exec objects not yet released */
};

struct QAicQueue {
    unsigned magic;
    QAicContext *context;
};

struct QAicQpcObj {
    unsigned magic; /* 0 once closed by its owner; freed when no program uses it either */
    int references;
    char *text;
    size_t text_size;
    int n_symbols, n_specs, n_bindings;
    long long spec[MAX_SPECS][MAX_SYMBOLS];
    Binding bindings[MAX_BINDINGS];
    int input_ids, position_ids, logits;
    int n_retained;
    int retained[MAX_BINDINGS]; /* binding index of retained input k */
};

struct QAicProgramProperties { /* the stand-in's own layout: the binding treats it as opaque */
    uint32_t selectMask;
    uint32_t submitRetries;
    uint64_t marker;
};

struct QAicProgram {
    unsigned magic;
    QAicContext *context;
    QAicQpcObj *qpc;
    int loaded, active, exec_objects;
    unsigned char *state[MAX_BINDINGS]; /* one "device" buffer per retained input, while loaded */
};

typedef struct {
    QBuffer buffer;
    uint32_t count;
    uint32_t elem;
    uint32_t dims[MAX_RANK];
} BoundBuffer;

struct QAicExecObj {
    unsigned magic;
    QAicContext *context;
    QAicProgram *program;
    int bound, pending;
    BoundBuffer bound_buffers[MAX_BINDINGS];
};

/* ---------------------------------------------------------------------------------------------
 * Helpers
 * ------------------------------------------------------------------------------------------ */

/* QAIC_STANDIN_FAIL=<call>[=<status>]: the test's way to make one call fail. */
static QStatus injected(const char *call)
{
    const char *spec = getenv("QAIC_STANDIN_FAIL");
    if (spec == NULL || spec[0] == '\0')
        return QS_OK;
    size_t n = strcspn(spec, "=");
    if (strlen(call) != n || strncmp(spec, call, n) != 0)
        return QS_OK;
    return spec[n] == '=' ? atoi(spec + n + 1) : QS_ERROR;
}

#define INJECT()                                                                                        \
    do {                                                                                                \
        QStatus injected_status = injected(__func__);                                                   \
        if (injected_status != QS_OK)                                                                   \
            return injected_status;                                                                     \
    } while (0)

/* Sleep for $<variable> milliseconds, if set: the test's way to make a call block. */
static void sleep_from_env(const char *variable)
{
    const char *ms = getenv(variable);
    if (ms != NULL && atoi(ms) > 0) {
        struct timespec pause = {atoi(ms) / 1000, (long)(atoi(ms) % 1000) * 1000000L};
        nanosleep(&pause, NULL);
    }
}

static int valid(const void *object, unsigned magic)
{
    return object != NULL && *(const unsigned *)object == magic;
}

static float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0x1fu) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exponent = 113;
        while (!(mantissa & 0x400u)) {
            mantissa <<= 1;
            exponent--;
        }
        bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* Round to nearest even; values too small for a normal half become zero (the program only
 * stores integers, which are exact up to 2048). */
static uint16_t float_to_half(float f)
{
    uint32_t x;
    memcpy(&x, &f, sizeof x);
    uint32_t sign = (x >> 16) & 0x8000u, mantissa = x & 0x7fffffu;
    int exponent = (int)((x >> 23) & 0xffu) - 127 + 15;
    if (((x >> 23) & 0xffu) == 0xffu)
        return (uint16_t)(sign | 0x7c00u | (mantissa ? 0x200u : 0u));
    if (exponent >= 31)
        return (uint16_t)(sign | 0x7c00u);
    if (exponent <= 0)
        return (uint16_t)sign;
    uint32_t h = sign | ((uint32_t)exponent << 10) | (mantissa >> 13), rest = mantissa & 0x1fffu;
    if (rest > 0x1000u || (rest == 0x1000u && (h & 1u)))
        h++;
    return (uint16_t)h;
}

static double load_element(const unsigned char *base, uint32_t elem, size_t i)
{
    if (elem == 2) {
        uint16_t h;
        memcpy(&h, base + i * 2, 2);
        return half_to_float(h);
    }
    float f;
    memcpy(&f, base + i * 4, 4);
    return f;
}

static void store_element(unsigned char *base, uint32_t elem, size_t i, double value)
{
    if (elem == 2) {
        uint16_t h = float_to_half((float)value);
        memcpy(base + i * 2, &h, 2);
    } else {
        float f = (float)value;
        memcpy(base + i * 4, &f, 4);
    }
}

static long long resolved_dim(const QAicQpcObj *qpc, const Binding *b, int spec, uint32_t d)
{
    return b->dim[d] >= 0 ? b->dim[d] : qpc->spec[spec][-(b->dim[d] + 1)];
}

static size_t resolved_bytes(const QAicQpcObj *qpc, const Binding *b, int spec)
{
    size_t bytes = b->elem;
    for (uint32_t d = 0; d < b->rank; d++)
        bytes *= (size_t)resolved_dim(qpc, b, spec, d);
    return bytes;
}

/* ---------------------------------------------------------------------------------------------
 * The QPC text
 * ------------------------------------------------------------------------------------------ */

static int next_token(const char **cursor, char *out)
{
    const char *p = *cursor;
    while (*p == ' ' || *p == '\n' || *p == '\t' || *p == '\r')
        p++;
    size_t n = 0;
    while (*p != '\0' && *p != ' ' && *p != '\n' && *p != '\t' && *p != '\r') {
        if (n + 1 >= MAX_NAME)
            return -1;
        out[n++] = *p++;
    }
    out[n] = '\0';
    *cursor = p;
    return n > 0 ? 0 : -1;
}

static int next_number(const char **cursor, long long *value)
{
    char token[MAX_NAME], *end;
    if (next_token(cursor, token) < 0)
        return -1;
    *value = strtoll(token, &end, 10);
    return *end == '\0' ? 0 : -1;
}

static int find_binding(const QAicQpcObj *qpc, const char *name, int is_output)
{
    for (int i = 0; i < qpc->n_bindings; i++)
        if (qpc->bindings[i].is_output == is_output && strcmp(qpc->bindings[i].name, name) == 0)
            return i;
    return -1;
}

static int parse_binding(QAicQpcObj *qpc, const char **cursor, char symbols[][MAX_NAME], Binding *b)
{
    char token[MAX_NAME];
    long long elem, rank;
    if (next_token(cursor, token) < 0 || (strcmp(token, "in") != 0 && strcmp(token, "out") != 0))
        return -1;
    b->is_output = strcmp(token, "out") == 0;
    if (next_token(cursor, b->name) < 0 || next_number(cursor, &elem) < 0 || next_number(cursor, &rank) < 0)
        return -1;
    if ((elem != 1 && elem != 2 && elem != 4 && elem != 8) || rank < 0 || rank > MAX_RANK)
        return -1;
    b->elem = (uint32_t)elem;
    b->rank = (uint32_t)rank;
    b->partner = -1;
    for (uint32_t d = 0; d < b->rank; d++) {
        if (next_token(cursor, token) < 0)
            return -1;
        char *end;
        long long value = strtoll(token, &end, 10);
        if (*end == '\0' && value >= 0) {
            b->dim[d] = value;
            continue;
        }
        int s = 0;
        while (s < qpc->n_symbols && strcmp(symbols[s], token) != 0)
            s++;
        if (s == qpc->n_symbols)
            return -1;
        b->dim[d] = -(long long)s - 1;
    }
    return 0;
}

/* The names the program needs, and the retained pairs (past_x in, past_x_RetainedState out). */
static int link_bindings(QAicQpcObj *qpc)
{
    qpc->input_ids = find_binding(qpc, "input_ids", 0);
    qpc->position_ids = find_binding(qpc, "position_ids", 0);
    qpc->logits = find_binding(qpc, "logits", 1);
    if (qpc->input_ids < 0 || qpc->position_ids < 0 || qpc->logits < 0)
        return -1;
    const Binding *ids = &qpc->bindings[qpc->input_ids], *pos = &qpc->bindings[qpc->position_ids];
    if (ids->elem != 8 || ids->rank != 2 || pos->elem != 8 || pos->rank != 2 || qpc->bindings[qpc->logits].elem != 4 ||
        qpc->bindings[qpc->logits].rank != 3)
        return -1;
    for (int i = 0; i < qpc->n_bindings; i++) {
        Binding *b = &qpc->bindings[i];
        char partner_name[MAX_NAME + 16];
        if (b->is_output)
            continue;
        snprintf(partner_name, sizeof partner_name, "%s_RetainedState", b->name);
        int j = find_binding(qpc, partner_name, 1);
        if (j < 0)
            continue;
        Binding *out = &qpc->bindings[j];
        if (b->rank != 4 || (b->elem != 2 && b->elem != 4) || out->elem != b->elem || out->rank != b->rank ||
            memcmp(out->dim, b->dim, sizeof b->dim) != 0)
            return -1;
        b->partner = j;
        out->partner = i;
        qpc->retained[qpc->n_retained++] = i;
    }
    return 0;
}

static int parse_qpc(QAicQpcObj *qpc)
{
    char token[MAX_NAME], symbols[MAX_SYMBOLS][MAX_NAME];
    const char *cursor = qpc->text;
    long long count;
    if (next_token(&cursor, token) < 0 || strcmp(token, "QEFF-STANDIN-QPC") != 0 || next_number(&cursor, &count) < 0 ||
        count != 1)
        return -1;
    if (next_token(&cursor, token) < 0 || strcmp(token, "symbols") != 0 || next_number(&cursor, &count) < 0 ||
        count < 0 || count > MAX_SYMBOLS)
        return -1;
    qpc->n_symbols = (int)count;
    for (int s = 0; s < qpc->n_symbols; s++)
        if (next_token(&cursor, symbols[s]) < 0)
            return -1;
    if (next_token(&cursor, token) < 0 || strcmp(token, "specs") != 0 || next_number(&cursor, &count) < 0 ||
        count < 1 || count > MAX_SPECS)
        return -1;
    qpc->n_specs = (int)count;
    for (int k = 0; k < qpc->n_specs; k++)
        for (int s = 0; s < qpc->n_symbols; s++)
            if (next_number(&cursor, &qpc->spec[k][s]) < 0 || qpc->spec[k][s] < 0)
                return -1;
    if (next_token(&cursor, token) < 0 || strcmp(token, "bindings") != 0 || next_number(&cursor, &count) < 0 ||
        count < 1 || count > MAX_BINDINGS)
        return -1;
    qpc->n_bindings = (int)count;
    for (int i = 0; i < qpc->n_bindings; i++)
        if (parse_binding(qpc, &cursor, symbols, &qpc->bindings[i]) < 0)
            return -1;
    return link_bindings(qpc);
}

static void qpc_unref(QAicQpcObj *qpc)
{
    if (--qpc->references > 0)
        return;
    free(qpc->text);
    free(qpc);
    live_objects--;
}

/* ---------------------------------------------------------------------------------------------
 * Context, queue, QPC, program
 * ------------------------------------------------------------------------------------------ */

QStatus qaicCreateContext(QAicContext **context, const QAicContextProperties *properties, uint32_t numDevices,
                          const QID *devices, QAicLogCallback logCallback, void *logUserData,
                          QAicErrorCallback errorCallback, void *errorUserData)
{
    (void)properties, (void)logCallback, (void)logUserData, (void)errorCallback, (void)errorUserData;
    INJECT();
    if (context == NULL || numDevices != 1 || devices == NULL)
        return QS_INVAL;
    const char *count = getenv("QAIC_STANDIN_DEVICES");
    if (devices[0] < 0 || devices[0] >= (count ? atoi(count) : 1))
        return QS_NODEV;
    QAicContext *c = calloc(1, sizeof *c);
    if (c == NULL)
        return QS_NOMEM;
    c->magic = MAGIC_CONTEXT;
    c->device = devices[0];
    live_objects++;
    *context = c;
    return QS_OK;
}

QStatus qaicReleaseContext(QAicContext *context)
{
    INJECT();
    sleep_from_env("QAIC_STANDIN_RELEASE_SLEEP_MS");
    if (!valid(context, MAGIC_CONTEXT))
        return QS_INVAL;
    if (context->children != 0)
        return QS_BUSY;
    context->magic = 0;
    free(context);
    live_objects--;
    return QS_OK;
}

QStatus qaicCreateQueue(QAicContext *context, QAicQueue **queue, const QAicQueueProperties *properties, QID device)
{
    (void)properties;
    INJECT();
    if (!valid(context, MAGIC_CONTEXT) || queue == NULL)
        return QS_INVAL;
    if (device != context->device)
        return QS_NODEV;
    QAicQueue *q = calloc(1, sizeof *q);
    if (q == NULL)
        return QS_NOMEM;
    q->magic = MAGIC_QUEUE;
    q->context = context;
    context->children++;
    live_objects++;
    *queue = q;
    return QS_OK;
}

QStatus qaicReleaseQueue(QAicQueue *queue)
{
    INJECT();
    if (!valid(queue, MAGIC_QUEUE))
        return QS_INVAL;
    queue->context->children--;
    queue->magic = 0;
    free(queue);
    live_objects--;
    return QS_OK;
}

static char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL)
        return NULL;
    char *text = NULL;
    long length;
    if (fseek(f, 0, SEEK_END) == 0 && (length = ftell(f)) >= 0 && fseek(f, 0, SEEK_SET) == 0 &&
        (text = malloc((size_t)length + 1)) != NULL) {
        if (fread(text, 1, (size_t)length, f) != (size_t)length) {
            free(text);
            text = NULL;
        } else {
            text[length] = '\0';
            *size = (size_t)length;
        }
    }
    fclose(f);
    return text;
}

QStatus qaicOpenQpcFile(QAicQpcObj **qpc, const char *path)
{
    INJECT();
    if (qpc == NULL || path == NULL)
        return QS_INVAL;
    QAicQpcObj *q = calloc(1, sizeof *q);
    if (q == NULL)
        return QS_NOMEM;
    q->text = read_file(path, &q->text_size);
    if (q->text == NULL || parse_qpc(q) < 0) {
        free(q->text);
        free(q);
        return QS_INVAL;
    }
    q->magic = MAGIC_QPC;
    q->references = 1;
    live_objects++;
    *qpc = q;
    return QS_OK;
}

QStatus qaicCloseQpc(QAicQpcObj *qpc)
{
    INJECT();
    if (!valid(qpc, MAGIC_QPC))
        return QS_INVAL;
    qpc->magic = 0; /* a program created from it keeps it alive */
    qpc_unref(qpc);
    return QS_OK;
}

QStatus qaicProgramPropertiesInitDefault(QAicProgramProperties *properties)
{
    INJECT();
    if (properties == NULL)
        return QS_INVAL;
    properties->selectMask = 0;
    properties->submitRetries = 5;
    properties->marker = MAGIC_PROPERTIES;
    return QS_OK;
}

QStatus qaicCreateProgram(QAicContext *context, QAicProgram **program, const QAicProgramProperties *properties,
                          QID device, const char *name, QAicQpcObj *qpc)
{
    INJECT();
    if (!valid(context, MAGIC_CONTEXT) || program == NULL || name == NULL || !valid(qpc, MAGIC_QPC))
        return QS_INVAL;
    if (properties != NULL && properties->marker != MAGIC_PROPERTIES)
        return QS_INVAL; /* properties must come from qaicProgramPropertiesInitDefault */
    if (device != context->device)
        return QS_NODEV;
    QAicProgram *p = calloc(1, sizeof *p);
    if (p == NULL)
        return QS_NOMEM;
    p->magic = MAGIC_PROGRAM;
    p->context = context;
    p->qpc = qpc;
    qpc->references++;
    context->children++;
    live_objects++;
    *program = p;
    return QS_OK;
}

QStatus qaicLoadProgram(QAicProgram *program)
{
    INJECT();
    if (!valid(program, MAGIC_PROGRAM) || program->loaded)
        return QS_INVAL;
    const QAicQpcObj *qpc = program->qpc;
    for (int k = 0; k < qpc->n_retained; k++) {
        size_t largest = 0; /* room for the largest specialization */
        for (int s = 0; s < qpc->n_specs; s++) {
            size_t bytes = resolved_bytes(qpc, &qpc->bindings[qpc->retained[k]], s);
            largest = bytes > largest ? bytes : largest;
        }
        program->state[k] = calloc(largest ? largest : 1, 1);
        if (program->state[k] == NULL) {
            for (int j = 0; j < k; j++)
                free(program->state[j]);
            return QS_NOMEM;
        }
    }
    program->loaded = 1;
    return QS_OK;
}

QStatus qaicUnloadProgram(QAicProgram *program)
{
    INJECT();
    if (!valid(program, MAGIC_PROGRAM) || !program->loaded)
        return QS_INVAL;
    if (program->active)
        return QS_BUSY;
    for (int k = 0; k < program->qpc->n_retained; k++) {
        free(program->state[k]);
        program->state[k] = NULL;
    }
    program->loaded = 0;
    return QS_OK;
}

QStatus qaicRunActivationCmd(QAicProgram *program, QAicProgramActivationCmd command)
{
    INJECT();
    if (!valid(program, MAGIC_PROGRAM))
        return QS_INVAL;
    if (command == QAIC_PROGRAM_CMD_ACTIVATE_FULL) {
        if (!program->loaded || program->active)
            return QS_INVAL;
        program->active = 1;
        return QS_OK;
    }
    if (command == QAIC_PROGRAM_CMD_DEACTIVATE_FULL) {
        if (!program->active)
            return QS_INVAL;
        program->active = 0;
        return QS_OK;
    }
    return QS_INVAL;
}

QStatus qaicReleaseProgram(QAicProgram *program)
{
    INJECT();
    if (!valid(program, MAGIC_PROGRAM))
        return QS_INVAL;
    if (program->loaded || program->exec_objects != 0)
        return QS_BUSY;
    program->context->children--;
    qpc_unref(program->qpc);
    program->magic = 0;
    free(program);
    live_objects--;
    return QS_OK;
}

QStatus qaicProgramGetIoDescriptor(QAicProgram *program, QData *ioDescriptor)
{
    INJECT();
    if (!valid(program, MAGIC_PROGRAM) || ioDescriptor == NULL)
        return QS_INVAL;
    ioDescriptor->data = (uint8_t *)program->qpc->text;
    ioDescriptor->size = program->qpc->text_size;
    return QS_OK;
}

/* ---------------------------------------------------------------------------------------------
 * Exec objects and the run
 * ------------------------------------------------------------------------------------------ */

QStatus qaicCreateExecObj(QAicContext *context, QAicExecObj **execObj, const QAicExecObjProperties *properties,
                          QAicProgram *program, const QData *ioDescriptor, void *dmaReserved1, void *dmaReserved2)
{
    (void)properties;
    INJECT();
    if (!valid(context, MAGIC_CONTEXT) || execObj == NULL || !valid(program, MAGIC_PROGRAM) ||
        program->context != context)
        return QS_INVAL;
    if (dmaReserved1 != NULL || dmaReserved2 != NULL)
        return QS_UNSUPPORTED;
    if (ioDescriptor != NULL && (const char *)ioDescriptor->data != program->qpc->text)
        return QS_INVAL; /* only the program's own descriptor */
    if (!program->active)
        return QS_INVAL;
    QAicExecObj *e = calloc(1, sizeof *e);
    if (e == NULL)
        return QS_NOMEM;
    e->magic = MAGIC_EXEC;
    e->context = context;
    e->program = program;
    program->exec_objects++;
    context->children++;
    live_objects++;
    *execObj = e;
    return QS_OK;
}

QStatus qaicReleaseExecObj(QAicExecObj *execObj)
{
    INJECT();
    if (!valid(execObj, MAGIC_EXEC))
        return QS_INVAL;
    execObj->program->exec_objects--;
    execObj->context->children--;
    execObj->magic = 0;
    free(execObj);
    live_objects--;
    return QS_OK;
}

/* One buffer against its binding: element size, rank, size = product(dims) * element size.
 * Zero size ("keep it on the device") is allowed for retained state only. */
static int check_buffer(const Binding *b, const QBuffer *buffer, const QBufferDimensions *dims)
{
    if (buffer->size == 0)
        return b->partner >= 0 ? 0 : -1;
    if (buffer->buf == NULL || dims->sizeOfElem != b->elem || dims->count != b->rank || dims->dims == NULL)
        return -1;
    uint64_t bytes = b->elem;
    for (uint32_t d = 0; d < dims->count; d++) {
        if (dims->dims[d] != 0 && bytes > UINT64_MAX / dims->dims[d])
            return -1;
        bytes *= dims->dims[d];
    }
    return bytes == buffer->size ? 0 : -1;
}

QStatus qaicExecObjSetDataExt(QAicExecObj *execObj, uint32_t numBuffers, const QBuffer *buffers,
                              const QBufferDimensions *dimensions)
{
    INJECT();
    if (!valid(execObj, MAGIC_EXEC) || buffers == NULL || dimensions == NULL)
        return QS_INVAL;
    const QAicQpcObj *qpc = execObj->program->qpc;
    execObj->bound = 0;
    if (numBuffers != (uint32_t)qpc->n_bindings)
        return QS_INVAL;
    for (uint32_t i = 0; i < numBuffers; i++)
        if (check_buffer(&qpc->bindings[i], &buffers[i], &dimensions[i]) < 0)
            return QS_INVAL;
    for (uint32_t i = 0; i < numBuffers; i++) {
        BoundBuffer *bound = &execObj->bound_buffers[i];
        bound->buffer = buffers[i];
        bound->elem = dimensions[i].sizeOfElem;
        bound->count = buffers[i].size ? dimensions[i].count : 0;
        for (uint32_t d = 0; d < bound->count; d++)
            bound->dims[d] = dimensions[i].dims[d];
    }
    execObj->bound = 1;
    return QS_OK;
}

QStatus qaicEnqueueExecObj(QAicQueue *queue, QAicExecObj *execObj, QAicEvent *event)
{
    INJECT();
    if (!valid(queue, MAGIC_QUEUE) || !valid(execObj, MAGIC_EXEC) || queue->context != execObj->context ||
        !execObj->bound || !execObj->program->active)
        return QS_INVAL;
    if (event != NULL)
        return QS_UNSUPPORTED;
    execObj->pending = 1;
    return QS_OK;
}

/* The first compiled specialization that every non-zero buffer's dims match, or -1. */
static int select_spec(const QAicExecObj *e)
{
    const QAicQpcObj *qpc = e->program->qpc;
    for (int s = 0; s < qpc->n_specs; s++) {
        int match = 1;
        for (int i = 0; i < qpc->n_bindings && match; i++) {
            const BoundBuffer *bound = &e->bound_buffers[i];
            for (uint32_t d = 0; d < bound->count && match; d++)
                match = (long long)bound->dims[d] == resolved_dim(qpc, &qpc->bindings[i], s, d);
        }
        if (match)
            return s;
    }
    return -1;
}

static void write_tokens(const QAicQpcObj *qpc, QAicProgram *program, const BoundBuffer *bound, int spec)
{
    const int64_t *ids = (const int64_t *)bound[qpc->input_ids].buffer.buf;
    const int64_t *pos = (const int64_t *)bound[qpc->position_ids].buffer.buf;
    const Binding *ids_binding = &qpc->bindings[qpc->input_ids];
    long long B = resolved_dim(qpc, ids_binding, spec, 0), S = resolved_dim(qpc, ids_binding, spec, 1);
    for (int k = 0; k < qpc->n_retained; k++) {
        const Binding *b = &qpc->bindings[qpc->retained[k]];
        long long H = resolved_dim(qpc, b, spec, 1), C = resolved_dim(qpc, b, spec, 2), D = resolved_dim(qpc, b, spec, 3);
        for (long long row = 0; row < B; row++)
            for (long long t = 0; t < S; t++) {
                long long p = pos[row * S + t];
                if (p < 0 || p >= C)
                    continue;
                for (long long h = 0; h < H; h++)
                    for (long long d = 0; d < D; d++)
                        store_element(program->state[k], b->elem, (size_t)(((row * H + h) * C + p) * D + d),
                                      (double)(ids[row * S + t] + k));
            }
    }
}

static void write_logits(const QAicQpcObj *qpc, const QAicProgram *program, const BoundBuffer *bound, int spec)
{
    const int64_t *ids = (const int64_t *)bound[qpc->input_ids].buffer.buf;
    const int64_t *pos = (const int64_t *)bound[qpc->position_ids].buffer.buf;
    float *logits = (float *)bound[qpc->logits].buffer.buf;
    const Binding *ids_binding = &qpc->bindings[qpc->input_ids], *out = &qpc->bindings[qpc->logits];
    long long B = resolved_dim(qpc, ids_binding, spec, 0), S = resolved_dim(qpc, ids_binding, spec, 1);
    long long L = resolved_dim(qpc, out, spec, 1), V = resolved_dim(qpc, out, spec, 2);
    for (long long row = 0; row < B; row++) {
        double total = 0;
        for (int k = 0; k < qpc->n_retained; k++) {
            const Binding *b = &qpc->bindings[qpc->retained[k]];
            size_t per_row = resolved_bytes(qpc, b, spec) / b->elem / (size_t)resolved_dim(qpc, b, spec, 0);
            for (size_t i = 0; i < per_row; i++)
                total += load_element(program->state[k], b->elem, (size_t)row * per_row + i);
        }
        long long last = -1, last_id = 0;
        for (long long t = 0; t < S; t++)
            if (pos[row * S + t] > last) {
                last = pos[row * S + t];
                last_id = ids[row * S + t];
            }
        for (long long l = 0; l < L; l++)
            for (long long v = 0; v < V; v++)
                logits[(row * L + l) * V + v] = (float)(total + (double)(v % 7) * (double)(last + 1) + (double)last_id);
    }
}

static QStatus execute(QAicExecObj *e, int spec)
{
    const QAicQpcObj *qpc = e->program->qpc;
    const BoundBuffer *bound = e->bound_buffers;
    const Binding *ids = &qpc->bindings[qpc->input_ids];
    if (resolved_dim(qpc, &qpc->bindings[qpc->logits], spec, 0) != resolved_dim(qpc, ids, spec, 0))
        return QS_DEV_ERROR;
    for (int k = 0; k < qpc->n_retained; k++)
        if (resolved_dim(qpc, &qpc->bindings[qpc->retained[k]], spec, 0) != resolved_dim(qpc, ids, spec, 0))
            return QS_DEV_ERROR; /* this program keeps one cache row per batch row */
    retained_bytes_in = retained_bytes_out = 0;
    for (int k = 0; k < qpc->n_retained; k++) {
        const QBuffer *in = &bound[qpc->retained[k]].buffer;
        if (in->size > 0) { /* replace the state; check_buffer and select_spec fixed its size */
            memcpy(e->program->state[k], in->buf, in->size);
            retained_bytes_in += (long long)in->size;
        }
    }
    write_tokens(qpc, e->program, bound, spec);
    write_logits(qpc, e->program, bound, spec);
    for (int k = 0; k < qpc->n_retained; k++) {
        const QBuffer *out = &bound[qpc->bindings[qpc->retained[k]].partner].buffer;
        if (out->size > 0) {
            memcpy(out->buf, e->program->state[k], out->size);
            retained_bytes_out += (long long)out->size;
        }
    }
    runs++;
    return QS_OK;
}

QStatus qaicExecObjWaitForCompletion(QAicExecObj *execObj, uint32_t timeout)
{
    (void)timeout;
    INJECT();
    if (!valid(execObj, MAGIC_EXEC) || !execObj->pending)
        return QS_INVAL;
    sleep_from_env("QAIC_STANDIN_SLEEP_MS");
    execObj->pending = 0;
    if (!execObj->program->active)
        return QS_DEV_ERROR;
    int spec = select_spec(execObj);
    if (spec < 0)
        return QS_DEV_ERROR; /* "No matching specialization found" */
    return execute(execObj, spec);
}

long long qaicStandinCounter(const char *name)
{
    if (strcmp(name, "live") == 0)
        return live_objects;
    if (strcmp(name, "runs") == 0)
        return runs;
    if (strcmp(name, "retained_bytes_in") == 0)
        return retained_bytes_in;
    if (strcmp(name, "retained_bytes_out") == 0)
        return retained_bytes_out;
    return -1;
}

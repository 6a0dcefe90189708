// emu_nccl.cpp: the CUDA host emulator's NCCL (tools/cuda-emu/README.md): communicators are MPI
// communicators, collectives run over MPI on the emulated device memory, when they are called
// (or at ncclGroupEnd), like every emulated stream operation. What it checks:
// - buffers lie inside one device allocation (host pointers and overruns are fatal);
// - every stream is the legacy stream or a live one;
// - non-blocking communicators (config.blocking = 0) answer ncclInProgress to init, split,
//   collectives, ncclGroupEnd and finalize, and report ncclInProgress once more through
//   ncclCommGetAsyncError before ncclSuccess: a call on a communicator still in progress is
//   fatal, as NCCL forbids it;
// - two ranks of a communicator on the same (emulated) GPU: ncclInvalidUsage, as in NCCL.
// The sum of ncclAllReduce is taken in rank order ((x_0 + x_1) + x_2) + ..., the order of
// comm.c's MPI all-reduce, so the two transports give the same bits here.
// EMU_NCCL_STALL=k: the k-th stream operation of NCCL (a collective outside a group, or a
// group) and all later ones never run and never finish: the events recorded after it stay
// incomplete, which models a hung collective (every rank stalls at the same operation).
// EMU_NCCL_ERROR=k: the k-th stream operation and all later ones stall as with EMU_NCCL_STALL,
// and a few ncclCommGetAsyncError calls later (the time it takes to notice a dead peer) every
// communicator reports ncclRemoteError.
#include <mpi.h>
#include <unistd.h>

#include <climits>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "inc/nccl.h"

struct ncclComm {
    MPI_Comm mpi;
    int rank, size;
    int blocking;
    ncclResult_t async; // what ncclCommGetAsyncError reports
    int polls;          // ncclInProgress answers left before async turns to ncclSuccess
    std::string name;
    // a non-blocking split in progress: NCCL writes the child's handle from its own thread when
    // the split's job is done (NULL until then), which the parent's state does not wait for:
    // here split_polls ncclCommGetAsyncError calls on the parent after it reports ncclSuccess
    ncclComm_t split_child;
    ncclComm_t *split_out;
    int split_polls;
};

static std::string last_error_;
static int group_depth_;
static long ops_issued_, stall_at_ = -1, error_at_ = -1;
static bool remote_error_;
static int error_polls_ = -1; // ncclCommGetAsyncError calls before the error shows, -1: none

[[noreturn]] static void fatal_(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void fatal_(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "\n*** cuda-emu (NCCL): ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\n");
    abort();
}

static ncclResult_t fail_(ncclResult_t r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static ncclResult_t fail_(ncclResult_t r, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    last_error_ = buf;
    return r;
}

static size_t type_size_(ncclDataType_t t) {
    switch (t) {
    case ncclInt8: case ncclUint8: case ncclFloat8e4m3: case ncclFloat8e5m2: return 1;
    case ncclFloat16: case ncclBfloat16: return 2;
    case ncclInt32: case ncclUint32: case ncclFloat32: return 4;
    case ncclInt64: case ncclUint64: case ncclFloat64: return 8;
    default: return 0;
    }
}

// A call on comm: not while it is still in progress (NCCL's rule for non-blocking
// communicators), and its stream must exist.
static void check_comm_(const char *api, ncclComm_t comm, cudaStream_t stream) {
    if (!comm) fatal_("%s: NULL communicator", api);
    if (comm->async == ncclInProgress)
        fatal_("%s on %s while the communicator is still in progress: poll "
               "ncclCommGetAsyncError until it is no longer ncclInProgress first",
               api, comm->name.c_str());
    if (!emu_stream_ok(stream)) fatal_("%s: stream %p is not a live stream", api, (void *)stream);
}

static void check_buf_(const char *api, const char *what, const void *p, size_t bytes) {
    if (bytes > 0 && !emu_dev_range_ok(p, bytes))
        fatal_("%s: %s [%p, +%zu bytes) is not inside one device allocation (a host pointer, or "
               "it runs past the end)",
               api, what, p, bytes);
    if (bytes > INT_MAX) fatal_("%s: %zu bytes: the emulation handles < 2^31", api, bytes);
}

// Non-blocking communicators answer ncclInProgress, once more through ncclCommGetAsyncError.
static ncclResult_t started_(ncclComm_t comm) {
    if (comm->blocking) return ncclSuccess;
    comm->async = ncclInProgress;
    comm->polls = 1;
    return ncclInProgress;
}

// Stream operations: 1 when this one runs, 0 when EMU_NCCL_STALL says it hangs.
static bool runs_(void) {
    if (stall_at_ < 0) {
        const char *s = getenv("EMU_NCCL_STALL");
        stall_at_ = s && *s ? atol(s) : 0;
        s = getenv("EMU_NCCL_ERROR");
        error_at_ = s && *s ? atol(s) : 0;
    }
    ++ops_issued_;
    if (error_at_ > 0 && ops_issued_ >= error_at_) {
        if (error_polls_ < 0) {
            fprintf(stderr, "cuda-emu (NCCL): EMU_NCCL_ERROR=%ld: this NCCL operation hangs and "
                            "the communicators will report ncclRemoteError\n", error_at_);
            error_polls_ = 3;
        }
        emu_stall_streams(1);
        return false;
    }
    if (stall_at_ > 0 && ops_issued_ >= stall_at_) {
        if (ops_issued_ == stall_at_)
            fprintf(stderr, "cuda-emu (NCCL): EMU_NCCL_STALL=%ld: this NCCL operation and all "
                            "later ones hang\n", stall_at_);
        emu_stall_streams(1);
        return false;
    }
    return true;
}

// ---- the operations ----

enum OpKind { OP_ALLREDUCE, OP_BCAST, OP_ALLGATHER, OP_SEND, OP_RECV };
struct Op {
    OpKind kind;
    ncclComm_t comm;
    const void *send;
    void *recv;
    size_t count; // elements (per rank for all-gather)
    ncclDataType_t type;
    int peer; // root or peer
};
static std::vector<Op> group_;

static void mpi_check_(int rc, const char *what) {
    if (rc != MPI_SUCCESS) fatal_("MPI call of %s failed (%d)", what, rc);
}

// Runs the collective op (not send / receive) inside the device access window.
static void run_coll_(const Op &o) {
    ncclComm_t c = o.comm;
    const size_t es = type_size_(o.type), bytes = o.count * es;
    switch (o.kind) {
    case OP_ALLREDUCE: {
        std::vector<float> all(o.count * (size_t)c->size);
        mpi_check_(MPI_Allgather(o.send, (int)o.count, MPI_FLOAT, all.data(), (int)o.count,
                                 MPI_FLOAT, c->mpi),
                   "ncclAllReduce");
        float *out = (float *)o.recv;
        for (size_t i = 0; i < o.count; i++) {
            float s = all[i];
            for (int j = 1; j < c->size; j++) s += all[(size_t)j * o.count + i];
            out[i] = s;
        }
        break;
    }
    case OP_BCAST:
        if (c->rank == o.peer && o.send != o.recv) memmove(o.recv, o.send, bytes);
        mpi_check_(MPI_Bcast(o.recv, (int)bytes, MPI_BYTE, o.peer, c->mpi), "ncclBroadcast");
        break;
    case OP_ALLGATHER: {
        const bool in_place = (const char *)o.send == (char *)o.recv + (size_t)c->rank * bytes;
        mpi_check_(MPI_Allgather(in_place ? MPI_IN_PLACE : o.send, (int)bytes, MPI_BYTE, o.recv,
                                 (int)bytes, MPI_BYTE, c->mpi),
                   "ncclAllGather");
        break;
    }
    default: break;
    }
}

// Runs a list of operations (one call, or a group): sends and receives posted first, the
// collectives in call order, then the sends and receives completed.
static void run_ops_(std::vector<Op> &ops) {
    if (ops.empty() || !runs_()) return;
    const char *prev = emu_dev_open("NCCL");
    std::vector<MPI_Request> reqs;
    for (const Op &o : ops) {
        if (o.kind != OP_SEND && o.kind != OP_RECV) continue;
        const int bytes = (int)(o.count * type_size_(o.type));
        MPI_Request r;
        if (o.kind == OP_SEND)
            mpi_check_(MPI_Isend(o.send, bytes, MPI_BYTE, o.peer, 7, o.comm->mpi, &r), "ncclSend");
        else
            mpi_check_(MPI_Irecv(o.recv, bytes, MPI_BYTE, o.peer, 7, o.comm->mpi, &r), "ncclRecv");
        reqs.push_back(r);
    }
    for (const Op &o : ops)
        if (o.kind != OP_SEND && o.kind != OP_RECV) run_coll_(o);
    if (!reqs.empty())
        mpi_check_(MPI_Waitall((int)reqs.size(), reqs.data(), MPI_STATUSES_IGNORE),
                   "ncclSend / ncclRecv");
    emu_dev_close(prev);
}

// Queues op in the open group, or runs it now.
static ncclResult_t issue_(const Op &o) {
    if (group_depth_ > 0) {
        group_.push_back(o);
        return ncclSuccess;
    }
    std::vector<Op> one{o};
    run_ops_(one);
    return started_(o.comm);
}

// ---- API ----

extern "C" {

const char *ncclGetErrorString(ncclResult_t r) {
    switch (r) {
    case ncclSuccess: return "no error";
    case ncclUnhandledCudaError: return "unhandled cuda error (run with NCCL_DEBUG=INFO for details)";
    case ncclSystemError: return "unhandled system error (run with NCCL_DEBUG=INFO for details)";
    case ncclInternalError: return "internal error - please report this issue to the NCCL developers";
    case ncclInvalidArgument: return "invalid argument (run with NCCL_DEBUG=WARN for details)";
    case ncclInvalidUsage: return "invalid usage (run with NCCL_DEBUG=WARN for details)";
    case ncclRemoteError: return "remote process exited or there was a network error";
    case ncclInProgress: return "NCCL operation in progress";
    default: return "unknown result code";
    }
}

const char *ncclGetLastError(ncclComm_t) {
    return last_error_.c_str();
}

ncclResult_t ncclGetVersion(int *v) {
    *v = NCCL_VERSION_CODE;
    return ncclSuccess;
}

// The id: a color for MPI_Comm_split (from the pid and a counter) and a tag.
ncclResult_t ncclGetUniqueId(ncclUniqueId *id) {
    static int counter;
    memset(id, 0, sizeof *id);
    int color = (int)((((unsigned)getpid() & 0xfffff) << 8) | (unsigned)(++counter & 0xff));
    memcpy(id->internal, "emu-nccl", 8);
    memcpy(id->internal + 8, &color, sizeof color);
    return ncclSuccess;
}

static int blocking_(const ncclConfig_t *config) {
    if (!config) return 1;
    if (config->magic != 0xcafebeef || config->size != sizeof(ncclConfig_t))
        fatal_("ncclConfig_t not initialized with NCCL_CONFIG_INITIALIZER");
    return config->blocking == NCCL_CONFIG_UNDEF_INT ? 1 : config->blocking != 0;
}

// NCCL refuses two ranks of a communicator on one GPU ("Duplicate GPU detected").
static ncclResult_t check_devices_(ncclComm_t c) {
    int dev = 0;
    cudaGetDevice(&dev);
    long me[2] = {gethostid(), dev};
    std::vector<long> all(2 * (size_t)c->size);
    mpi_check_(MPI_Allgather(me, 2, MPI_LONG, all.data(), 2, MPI_LONG, c->mpi), "init");
    for (int j = 0; j < c->size; j++)
        if (j != c->rank && all[2 * (size_t)j] == me[0] && all[2 * (size_t)j + 1] == me[1])
            return fail_(ncclInvalidUsage,
                         "Duplicate GPU detected : rank %d and rank %d both on CUDA device %d",
                         c->rank, j, dev);
    return ncclSuccess;
}

static ncclComm_t new_comm_(MPI_Comm m, int blocking, const ncclConfig_t *config) {
    ncclComm_t c = new ncclComm();
    c->mpi = m;
    MPI_Comm_rank(m, &c->rank);
    MPI_Comm_size(m, &c->size);
    MPI_Comm_set_errhandler(m, MPI_ERRORS_RETURN);
    c->blocking = blocking;
    c->async = ncclSuccess;
    c->name = config && config->commName ? config->commName : "a communicator";
    return c;
}

ncclResult_t ncclCommInitRankConfig(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank,
                                    ncclConfig_t *config) {
    const int blocking = blocking_(config);
    *comm = nullptr;
    if (memcmp(id.internal, "emu-nccl", 8) != 0)
        return fail_(ncclInvalidArgument, "ncclCommInitRank: the unique id is not from "
                                          "ncclGetUniqueId (was it broadcast?)");
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail_(ncclInvalidArgument, "ncclCommInitRank: rank %d of %d", rank, nranks);
    int inited = 0;
    MPI_Initialized(&inited);
    if (!inited) {
        if (nranks != 1) fatal_("ncclCommInitRank of %d ranks without MPI", nranks);
        MPI_Init(nullptr, nullptr); // the emulation's transport (a build without MPI: never)
    }
    MPI_Comm m;
    if (nranks == 1) {
        mpi_check_(MPI_Comm_dup(MPI_COMM_SELF, &m), "ncclCommInitRank");
    } else {
        // the ranks of one communicator all call with the same id: split MPI_COMM_WORLD by it
        int color;
        memcpy(&color, id.internal + 8, sizeof color);
        mpi_check_(MPI_Comm_split(MPI_COMM_WORLD, color, rank, &m), "ncclCommInitRank");
    }
    ncclComm_t c = new_comm_(m, blocking, config);
    if (c->size != nranks || c->rank != rank)
        fatal_("ncclCommInitRank: rank %d of %d, but %d ranks of MPI_COMM_WORLD called it with "
               "this id (the emulation needs every rank of the world to create the "
               "communicator)",
               rank, nranks, c->size);
    ncclResult_t r = check_devices_(c);
    if (r != ncclSuccess) {
        MPI_Comm_free(&c->mpi);
        delete c;
        return r;
    }
    *comm = c;
    return started_(c);
}

ncclResult_t ncclCommInitRank(ncclComm_t *comm, int nranks, ncclUniqueId id, int rank) {
    return ncclCommInitRankConfig(comm, nranks, id, rank, nullptr);
}

ncclResult_t ncclCommSplit(ncclComm_t comm, int color, int key, ncclComm_t *newcomm,
                           ncclConfig_t *config) {
    check_comm_("ncclCommSplit", comm, nullptr);
    const int blocking = config ? blocking_(config) : comm->blocking;
    MPI_Comm m;
    mpi_check_(MPI_Comm_split(comm->mpi, color == NCCL_SPLIT_NOCOLOR ? MPI_UNDEFINED : color, key,
                              &m),
               "ncclCommSplit");
    ncclComm_t child = m == MPI_COMM_NULL ? nullptr : new_comm_(m, blocking, config);
    if (child) started_(child);
    ncclResult_t r = started_(comm); // the split is an operation of the parent too
    if (r == ncclInProgress) { // as NCCL: "*newcomm should be NULL until the split completes"
        *newcomm = nullptr;
        comm->split_child = child;
        comm->split_out = newcomm;
        comm->split_polls = 2;
    } else {
        *newcomm = child;
    }
    return r;
}

ncclResult_t ncclCommGetAsyncError(ncclComm_t comm, ncclResult_t *state) {
    if (!comm || !state) return ncclInvalidArgument;
    if (comm->async == ncclInProgress && comm->polls-- <= 0) comm->async = ncclSuccess;
    if (comm->async == ncclSuccess && comm->split_out && comm->split_polls-- <= 0) {
        *comm->split_out = comm->split_child;
        comm->split_out = nullptr;
    }
    if (error_polls_ >= 0 && !remote_error_ && error_polls_-- == 0) {
        remote_error_ = true;
        last_error_ = "emulated: a peer exited (EMU_NCCL_ERROR)";
    }
    *state = remote_error_ && comm->async == ncclSuccess ? ncclRemoteError : comm->async;
    return ncclSuccess;
}

ncclResult_t ncclCommCount(const ncclComm_t comm, int *count) {
    if (!comm) return ncclInvalidArgument;
    *count = comm->size;
    return ncclSuccess;
}

ncclResult_t ncclCommUserRank(const ncclComm_t comm, int *rank) {
    if (!comm) return ncclInvalidArgument;
    *rank = comm->rank;
    return ncclSuccess;
}

ncclResult_t ncclCommFinalize(ncclComm_t comm) {
    check_comm_("ncclCommFinalize", comm, nullptr);
    return started_(comm);
}

ncclResult_t ncclCommDestroy(ncclComm_t comm) {
    if (!comm) return ncclSuccess;
    if (comm->async == ncclInProgress)
        fatal_("ncclCommDestroy on %s while it is still in progress", comm->name.c_str());
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (!finalized) MPI_Comm_free(&comm->mpi);
    delete comm;
    return ncclSuccess;
}

// The peers may be dead: no MPI call (the MPI communicator is left behind).
ncclResult_t ncclCommAbort(ncclComm_t comm) {
    delete comm;
    return ncclSuccess;
}

ncclResult_t ncclAllReduce(const void *send, void *recv, size_t count, ncclDataType_t type,
                           ncclRedOp_t op, ncclComm_t comm, cudaStream_t stream) {
    check_comm_("ncclAllReduce", comm, stream);
    if (type != ncclFloat32 || op != ncclSum)
        return fail_(ncclInvalidArgument, "ncclAllReduce: the emulation has float sums only");
    check_buf_("ncclAllReduce", "sendbuff", send, count * 4);
    check_buf_("ncclAllReduce", "recvbuff", recv, count * 4);
    return issue_(Op{OP_ALLREDUCE, comm, send, recv, count, type, 0});
}

ncclResult_t ncclBroadcast(const void *send, void *recv, size_t count, ncclDataType_t type,
                           int root, ncclComm_t comm, cudaStream_t stream) {
    check_comm_("ncclBroadcast", comm, stream);
    if (root < 0 || root >= comm->size || !type_size_(type))
        return fail_(ncclInvalidArgument, "ncclBroadcast: root %d of %d, type %d", root,
                     comm->size, (int)type);
    if (comm->rank == root) check_buf_("ncclBroadcast", "sendbuff", send, count * type_size_(type));
    check_buf_("ncclBroadcast", "recvbuff", recv, count * type_size_(type));
    return issue_(Op{OP_BCAST, comm, send, recv, count, type, root});
}

ncclResult_t ncclAllGather(const void *send, void *recv, size_t count, ncclDataType_t type,
                           ncclComm_t comm, cudaStream_t stream) {
    check_comm_("ncclAllGather", comm, stream);
    if (!type_size_(type)) return fail_(ncclInvalidArgument, "ncclAllGather: type %d", (int)type);
    check_buf_("ncclAllGather", "sendbuff", send, count * type_size_(type));
    check_buf_("ncclAllGather", "recvbuff", recv, count * type_size_(type) * (size_t)comm->size);
    return issue_(Op{OP_ALLGATHER, comm, send, recv, count, type, 0});
}

ncclResult_t ncclSend(const void *send, size_t count, ncclDataType_t type, int peer,
                      ncclComm_t comm, cudaStream_t stream) {
    check_comm_("ncclSend", comm, stream);
    if (peer < 0 || peer >= comm->size || !type_size_(type))
        return fail_(ncclInvalidArgument, "ncclSend: peer %d of %d", peer, comm->size);
    check_buf_("ncclSend", "sendbuff", send, count * type_size_(type));
    return issue_(Op{OP_SEND, comm, send, nullptr, count, type, peer});
}

ncclResult_t ncclRecv(void *recv, size_t count, ncclDataType_t type, int peer, ncclComm_t comm,
                      cudaStream_t stream) {
    check_comm_("ncclRecv", comm, stream);
    if (peer < 0 || peer >= comm->size || !type_size_(type))
        return fail_(ncclInvalidArgument, "ncclRecv: peer %d of %d", peer, comm->size);
    check_buf_("ncclRecv", "recvbuff", recv, count * type_size_(type));
    return issue_(Op{OP_RECV, comm, nullptr, recv, count, type, peer});
}

ncclResult_t ncclGroupStart(void) {
    group_depth_++;
    return ncclSuccess;
}

ncclResult_t ncclGroupEnd(void) {
    if (group_depth_ <= 0) return fail_(ncclInvalidUsage, "ncclGroupEnd without ncclGroupStart");
    if (--group_depth_ > 0) return ncclSuccess;
    std::vector<Op> ops;
    ops.swap(group_);
    run_ops_(ops);
    ncclResult_t r = ncclSuccess;
    for (const Op &o : ops)
        if (started_(o.comm) == ncclInProgress) r = ncclInProgress;
    return r;
}

} // extern "C"

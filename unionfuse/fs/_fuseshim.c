/*
 * _fuseshim: lets the daemon use kernel FUSE caching features that pyfuse3 does not
 * expose, without changing pyfuse3.
 *
 * How: this module is loaded with RTLD_GLOBAL *before* pyfuse3, so pyfuse3's call to
 * fuse_session_new() binds to the definition below.  We copy pyfuse3's operation table,
 * wrap a few entries, and hand the copy to libfuse's real fuse_session_new().  Every
 * wrapper ends in pyfuse3's own handler; nothing here knows about the union.
 *
 * What the wrappers do (each one only if configure() asked for it):
 *
 *  - NO_OPENDIR: OPENDIR is answered ENOSYS here, in C.  A kernel that announced
 *    FUSE_CAP_NO_OPENDIR_SUPPORT then never sends OPENDIR/RELEASEDIR again and opens
 *    directories with FOPEN_KEEP_CACHE|FOPEN_CACHE_DIR: listings are kept in the page
 *    cache and reused by later opens until the directory changes (the kernel drops the
 *    cache itself on every create/unlink/rename through the mount).  READDIR(PLUS) and
 *    FSYNCDIR then arrive with fh 0; we pass the inode instead, tagged with INO_TAG, so
 *    the Python handler knows which directory is meant.
 *    Without kernel support the wrapper falls back to asking pyfuse3 as usual, but with
 *    FOPEN_CACHE_DIR set on the reply.
 *  - NO_OPEN: the same for files.  OPEN is answered ENOSYS here; the kernel then opens
 *    files itself with FOPEN_KEEP_CACHE and sends no OPEN/RELEASE at all (an open and a
 *    close cost no round trip).  READ/WRITE/FSYNC/FLUSH/SETATTR arrive with fh 0 and get
 *    the tagged inode, as above; the daemon keeps one fd per inode.  atomic_o_trunc is
 *    turned off so open(O_TRUNC) still reaches the daemon (as SETATTR size=0).
 *    With PASSTHROUGH (and a kernel that offers it) OPEN is not refused: see "FUSE
 *    passthrough" below.
 *  - CACHE_SYMLINKS: readlink answers are cached by the kernel (symlinks never change
 *    in place; replacing one goes through us and drops the cache).
 *
 *  - FASTPATH: a few requests are answered here, from a table the daemon keeps of
 *    inodes whose answer needs no union logic (fp_set/fp_clear, below): READ from the
 *    daemon's cached fd, WRITE to it (a file already in the upper layer), GETATTR by
 *    fstat (a lower file, an upper file not in a hard-link group, or a directory's
 *    O_PATH fd; nlink forced to 0 for an unlinked file, 1 for a merged dir), SETATTR
 *    by ftruncate/fchown/fchmod/futimens (an upper file), GETXATTR "security.capability" for a
 *    file known to have none (the kernel asks before every write), and RELEASE of a
 *    file the daemon never opened (fh 0).  A negative LOOKUP in a directory that has
 *    no lower layer (fstatat on its O_PATH fd finds nothing).  And plain READDIR: the daemon passes a
 *    callable to fp_enable(), and the kernel is let send READDIR instead of READDIRPLUS
 *    (FUSE_CAP_READDIRPLUS_AUTO, libfuse's default that pyfuse3 turns off) for a
 *    listing nobody stats as it goes; the callable answers with ready-made fuse_dirent
 *    records, so such a listing creates no inode per name.  Anything else, and any inode not in the
 *    table, goes to pyfuse3 as before.  The table belongs to the daemon's one trio
 *    thread: it is only read here, inside fuse_session_process_buf() called from
 *    that thread, and only written by the daemon from that thread; the daemon clears
 *    an entry before it closes the fd or changes what the inode stands for.
 *
 * status() reports what is in effect, so the daemon can log it and tests can check it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <linux/fuse.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define SHIM_NO_OPENDIR 1u
#define SHIM_CACHE_SYMLINKS 2u
#define SHIM_NO_OPEN 4u
#define SHIM_FASTPATH 8u
#define SHIM_PASSTHROUGH 16u

/* what a fast-path table entry allows */
#define FP_READ 1u    /* READ from fd */
#define FP_WRITE 2u   /* WRITE to fd (read-write, upper) */
#define FP_ATTR 4u    /* GETATTR = fstat(fd) */
#define FP_SETATTR 8u /* SETATTR on fd (with FP_ATTR and FP_WRITE) */
#define FP_NOCAPS 16u /* no security.capability xattr */
#define FP_NLINK0 32u /* GETATTR/SETATTR answer nlink 0 (the file has no name left) */
#define FP_NLINK1 64u /* GETATTR answers nlink 1 (a merged directory) */
#define FP_UPPERONLY 128u /* a directory whose names all come from its fd's dir (no
                           * lower layer): a name missing there is a negative LOOKUP */
#define FP_CACHED_OPEN 256u /* (passthrough on) a read-only OPEN of this file is answered
                             * here without a backing file: the kernel caches its pages */

#define INO_TAG (1ULL << 63) /* above every inode number (private ones start at 1<<62) */

static unsigned int want_flags;      /* what configure() asked for */
static int interposed;               /* our fuse_session_new ran */
static int kernel_no_opendir;        /* kernel supports NO_OPENDIR (set in INIT) */
static int opendir_enosys_sent;      /* we answered ENOSYS to an OPENDIR */
static int cache_symlinks_on;        /* FUSE_CAP_CACHE_SYMLINKS wanted and granted */
static int kernel_no_open;           /* kernel supports NO_OPEN (set in INIT) */
static int opendir_wrapped, open_wrapped; /* our wrappers are in the table */
static int open_enosys_sent;         /* we answered ENOSYS to an OPEN */
static int fastpath_wrapped;         /* getattr/getxattr wrappers are in the table */
static int splice_write_on;          /* FUSE_CAP_SPLICE_WRITE granted */
static PyObject *rd_cb;              /* the daemon's plain-READDIR answerer (fp_enable) */
static int rd_plain_on;              /* FUSE_CAP_READDIRPLUS_AUTO wanted and granted */

/* -- tables keyed by inode: open addressing, ino 0 = empty ------------------------- */

struct tab {
    char *t;
    size_t esz;  /* entry size; every entry starts with its uint64_t ino */
    size_t cap;  /* power of two, or 0 */
    size_t used; /* live + tombstones */
    size_t live;
};

#define TAB_TOMB UINT64_MAX
#define TAB_INO(tb, i) (*(uint64_t *)((tb)->t + (i) * (tb)->esz))

static inline size_t tab_hash(uint64_t ino)
{
    return (size_t)((ino * 0x9E3779B97F4A7C15ULL) >> 17);
}

static void *tab_get(struct tab *tb, uint64_t ino)
{
    if (!tb->live || ino == 0 || ino == TAB_TOMB)
        return NULL;
    size_t mask = tb->cap - 1;
    for (size_t i = tab_hash(ino) & mask;; i = (i + 1) & mask) {
        uint64_t k = TAB_INO(tb, i);
        if (k == ino)
            return tb->t + i * tb->esz;
        if (k == 0)
            return NULL;
    }
}

static int tab_grow(struct tab *tb)
{
    size_t ncap = tb->cap ? tb->cap : 256;
    while ((tb->live + 1) * 2 > ncap)
        ncap *= 2;
    char *nt = calloc(ncap, tb->esz);
    if (!nt)
        return -1;
    for (size_t j = 0; j < tb->cap; j++) {
        uint64_t ino = TAB_INO(tb, j);
        if (ino == 0 || ino == TAB_TOMB)
            continue;
        size_t i = tab_hash(ino) & (ncap - 1);
        while (*(uint64_t *)(nt + i * tb->esz))
            i = (i + 1) & (ncap - 1);
        memcpy(nt + i * tb->esz, tb->t + j * tb->esz, tb->esz);
    }
    free(tb->t);
    tb->t = nt;
    tb->cap = ncap;
    tb->used = tb->live;
    return 0;
}

/* the entry for *ino*, added (zeroed but for ino) if missing; NULL: out of memory */
static void *tab_put(struct tab *tb, uint64_t ino)
{
    void *e = tab_get(tb, ino);
    if (e)
        return e;
    if ((tb->used + 1) * 4 > tb->cap * 3 && tab_grow(tb) < 0)
        return NULL;
    size_t mask = tb->cap - 1;
    size_t i = tab_hash(ino) & mask;
    while (TAB_INO(tb, i) != 0 && TAB_INO(tb, i) != TAB_TOMB)
        i = (i + 1) & mask;
    if (TAB_INO(tb, i) == 0)
        tb->used++;
    memset(tb->t + i * tb->esz, 0, tb->esz);
    TAB_INO(tb, i) = ino;
    tb->live++;
    return tb->t + i * tb->esz;
}

static void tab_del(struct tab *tb, void *e)
{
    memset(e, 0, tb->esz);
    *(uint64_t *)e = TAB_TOMB;
    tb->live--;
}

/* fast-path table: ino -> (fd, flags) */
struct fp_ent {
    uint64_t ino;
    int fd;
    unsigned int flags;
};

enum { FPS_READ, FPS_WRITE, FPS_GETATTR, FPS_SETATTR, FPS_GETXATTR, FPS_RELEASE, FPS_READDIR,
       FPS_LOOKUP, FPS_OPEN, FPS_N };
static const char *const fp_stat_names[FPS_N] = {"read", "write", "getattr", "setattr",
                                                 "getxattr", "release", "readdir", "lookup",
                                                 "open"};
static unsigned long long fp_stats[FPS_N];
static struct tab fp_tab = {NULL, sizeof(struct fp_ent), 0, 0, 0};
static int fp_on;      /* the daemon enabled it (fp_enable) */
static double fp_timeout = 1.0;

static inline struct fp_ent *fp_get(uint64_t ino)
{
    return tab_get(&fp_tab, ino);
}

static int fp_put(uint64_t ino, int fd, unsigned int flags)
{
    struct fp_ent *e = tab_put(&fp_tab, ino);
    if (!e)
        return -1;
    e->fd = fd;
    e->flags = flags;
    return 0;
}

static void fp_del(uint64_t ino)
{
    struct fp_ent *e = fp_get(ino);
    if (e)
        tab_del(&fp_tab, e);
}

/* -- FUSE passthrough ----------------------------------------------------------------
 *
 * With passthrough (Linux 6.9+, CAP_SYS_ADMIN) the kernel reads and writes an open file's
 * backing file itself: no READ/WRITE request, and the page cache is the backing file's
 * own (shared with every other mount of the same layer).  libfuse 3.14 knows nothing of
 * it, so: the INIT reply is amended on its way out (custom io below: FUSE_PASSTHROUGH,
 * max_stack_depth, and no writeback cache, which the kernel does not combine with it);
 * the daemon registers backing files by fd (backing_open) and tells us which one an inode
 * uses (pt_set); and every OPEN/CREATE reply for a tagged fh gets FOPEN_PASSTHROUGH and
 * that backing id on its way out.
 *
 * The kernel's rule: all files open on one inode use the same backing file (or none).
 * So we count the opens per inode (open replies sent, RELEASEs seen) and, while there
 * are any, answer later opens with the backing they use (open_bid), or none if they use
 * none (the daemon gives lower files of a writable mount no backing: see operations.py
 * _pt_backing).  A backing id the daemon retires while files use it (pt_retire) is
 * closed at the last release of those files. */

#define FOPEN_PASSTHROUGH_ (1u << 7)
#define FUSE_PASSTHROUGH_FLAGS2 (1u << 5) /* FUSE_PASSTHROUGH is bit 37 of the flags */
#define FUSE_INIT_EXT_ (1u << 30)
#define FUSE_WRITEBACK_CACHE_ (1u << 16)
struct fuse_backing_map_ {
    int32_t fd;
    uint32_t flags;
    uint64_t padding;
};
#define FUSE_DEV_IOC_BACKING_OPEN_ _IOW(229, 1, struct fuse_backing_map_)
#define FUSE_DEV_IOC_BACKING_CLOSE_ _IOW(229, 2, uint32_t)

struct pt_ent {
    uint64_t ino;
    int32_t bid;      /* the backing id the daemon set for the inode (0: none) */
    int32_t open_bid; /* the one its open files use (while opens > 0) */
    int32_t opens;    /* open replies sent minus RELEASEs seen */
    int32_t writers;  /* ...of them, opened for writing */
};

/* Writes through a shared mapping of a backing file change its mtime without the
 * kernel updating this inode: while a file is open for writing, attributes are
 * answered with this timeout instead of the mount's (see shim_getattr). */
#define PT_WRITER_ATTR_TIMEOUT 1.0
static struct tab pt_tab = {NULL, sizeof(struct pt_ent), 0, 0, 0};
static int pt_wanted;       /* configure() asked for it */
static int pt_offered;      /* the kernel's INIT offered FUSE_PASSTHROUGH */
static int pt_going;        /* INIT is being answered with it (set in shim_init) */
static int pt_on;           /* our INIT reply accepted it */
static int pt_depth = 1;    /* max_stack_depth we announce */
static int pt_fd = -1;      /* the session's /dev/fuse fd */
static uint64_t init_unique;
static int init_pending;
static unsigned long long pt_stats[2]; /* opens answered with a backing; ids closed */

struct pt_pend {
    uint64_t unique;
    uint32_t opcode;
    uint32_t flags; /* the open(2) flags */
};
static struct pt_pend *pt_pending; /* OPEN/CREATE requests read and not yet answered */
static int pt_npending, pt_cpending;

static void pt_close_id(int32_t id)
{
    uint32_t u = (uint32_t)id;
    if (id > 0 && pt_fd >= 0 && ioctl(pt_fd, FUSE_DEV_IOC_BACKING_CLOSE_, &u) == 0)
        pt_stats[1]++;
}

/* an open reply for a tagged fh is on its way: pick its backing and count it */
static void pt_patch_open(struct fuse_open_out *o, uint32_t flags)
{
    if (!(o->fh & INO_TAG))
        return;
    struct pt_ent *e = tab_put(&pt_tab, o->fh & ~INO_TAG);
    if (!e)
        return;
    int32_t id = e->opens > 0 ? e->open_bid : e->bid;
    if (id > 0) {
        /* the kernel takes no other flag with it (keep_cache: the backing file's cache
         * is the one used) */
        o->open_flags = (o->open_flags & FOPEN_DIRECT_IO) | FOPEN_PASSTHROUGH_;
        /* backing_id: the field after open_flags ("padding" in headers before 6.9) */
        memcpy((char *)o + 12, &id, sizeof(id));
        pt_stats[0]++;
    }
    if (e->opens == 0)
        e->open_bid = id;
    e->opens++;
    if ((flags & O_ACCMODE) != O_RDONLY)
        e->writers++;
}

static void pt_unopen(uint64_t ino, uint32_t flags)
{
    struct pt_ent *e = tab_get(&pt_tab, ino);
    if (!e || e->opens <= 0)
        return;
    if ((flags & O_ACCMODE) != O_RDONLY && e->writers > 0)
        e->writers--;
    if (--e->opens == 0) {
        if (e->open_bid > 0 && e->open_bid != e->bid)
            pt_close_id(e->open_bid);
        e->open_bid = 0;
    }
}

static ssize_t io_read(int fd, void *buf, size_t len, void *ud)
{
    (void)ud;
    return read(fd, buf, len);
}

static ssize_t io_splice(int fdin, off_t *offin, int fdout, off_t *offout, size_t len,
                         unsigned int flags, void *ud)
{
    (void)ud;
    return splice(fdin, offin, fdout, offout, len, flags);
}

static ssize_t io_writev(int fd, struct iovec *iov, int count, void *ud)
{
    (void)ud;
    struct fuse_out_header *oh = count >= 1 && iov[0].iov_len == sizeof(*oh) ? iov[0].iov_base : NULL;
    struct fuse_open_out *opened = NULL;
    uint32_t oflags = 0;
    if (oh && init_pending && oh->unique == init_unique) {
        init_pending = 0;
        if (oh->error == 0 && count >= 2 && iov[1].iov_len >= 40 && pt_going) {
            char *b = iov[1].iov_base; /* struct fuse_init_out */
            uint32_t flags, flags2;
            memcpy(&flags, b + 12, 4);
            memcpy(&flags2, b + 32, 4);
            flags = (flags | FUSE_INIT_EXT_) & ~FUSE_WRITEBACK_CACHE_;
            flags2 |= FUSE_PASSTHROUGH_FLAGS2;
            uint32_t depth = (uint32_t)pt_depth;
            memcpy(b + 12, &flags, 4);
            memcpy(b + 32, &flags2, 4);
            memcpy(b + 36, &depth, 4);
            pt_on = 1;
        }
    } else if (oh && pt_npending) {
        for (int i = 0; i < pt_npending; i++) {
            if (pt_pending[i].unique != oh->unique)
                continue;
            uint32_t op = pt_pending[i].opcode;
            oflags = pt_pending[i].flags;
            pt_pending[i] = pt_pending[--pt_npending];
            size_t at = op == FUSE_CREATE ? sizeof(struct fuse_entry_out) : 0;
            if (oh->error == 0 && count == 2 && iov[1].iov_len == at + sizeof(struct fuse_open_out)) {
                opened = (struct fuse_open_out *)((char *)iov[1].iov_base + at);
                pt_patch_open(opened, oflags);
            }
            break;
        }
    }
    ssize_t r = writev(fd, iov, count);
    if (r < 0 && opened && (opened->fh & INO_TAG)) /* the kernel took no open: no RELEASE */
        pt_unopen(opened->fh & ~INO_TAG, oflags);
    return r;
}

/* a request was read: note what the replies to it will need */
static void pt_note_request(struct fuse_session *se, const struct fuse_buf *buf, int res)
{
    if ((buf->flags & FUSE_BUF_IS_FD) || (size_t)res < sizeof(struct fuse_in_header))
        return;
    const struct fuse_in_header *in = buf->mem;
    if (in->opcode == FUSE_INIT && (size_t)res >= sizeof(*in) + 16) {
        const char *a = (const char *)(in + 1); /* struct fuse_init_in */
        uint32_t flags = 0, flags2 = 0;
        memcpy(&flags, a + 12, 4);
        if ((flags & FUSE_INIT_EXT_) && (size_t)res >= sizeof(*in) + 20)
            memcpy(&flags2, a + 16, 4);
        pt_offered = !!(flags2 & FUSE_PASSTHROUGH_FLAGS2);
        init_unique = in->unique;
        init_pending = 1;
        pt_fd = fuse_session_fd(se);
    } else if (pt_on && (in->opcode == FUSE_OPEN || in->opcode == FUSE_CREATE)) {
        if (pt_npending == pt_cpending) {
            int ncap = pt_cpending ? 2 * pt_cpending : 16;
            struct pt_pend *np = realloc(pt_pending, (size_t)ncap * sizeof(*np));
            if (!np)
                return; /* answered without a backing; see pt_patch_open's caller */
            pt_pending = np;
            pt_cpending = ncap;
        }
        pt_pending[pt_npending].unique = in->unique;
        pt_pending[pt_npending].flags = 0;
        if ((size_t)res >= sizeof(*in) + 4) /* fuse_open_in / fuse_create_in: flags first */
            memcpy(&pt_pending[pt_npending].flags, in + 1, 4);
        pt_pending[pt_npending].opcode = in->opcode;
        pt_npending++;
    }
}

/* Big copies run without the GIL (a copy-up thread may want it meanwhile); small ones
 * are over before a switch would pay for itself. */
#define FP_NOGIL_MIN 65536
#define FP_NOGIL_IF(cond, stmt)                                                             \
    do {                                                                                    \
        if (cond) {                                                                         \
            Py_BEGIN_ALLOW_THREADS stmt;                                                    \
            Py_END_ALLOW_THREADS                                                            \
        } else {                                                                            \
            stmt;                                                                           \
        }                                                                                   \
    } while (0)

/* the entry for a request on *ino* with *fi* (NULL: not ours), allowing *need* */
static struct fp_ent *fp_for(fuse_ino_t ino, struct fuse_file_info *fi, unsigned int need)
{
    if (!fp_on || (fi && fi->fh != ((uint64_t)ino | INO_TAG)))
        return NULL;
    struct fp_ent *e = fp_get(ino);
    return (e && (e->flags & need) == need) ? e : NULL;
}

static struct fuse_lowlevel_ops real_ops; /* pyfuse3's table */
static struct fuse_lowlevel_ops our_ops;

/* -- the C serve loop (see fuse_session_receive_buf below) ------------------------- */

static int loop_on;            /* the daemon enabled it (loop_enable) */
static int loop_busy;          /* the daemon has work running in threads: trio must run */
static int loop_wake_fd = -1;  /* read end of trio's wakeup socketpair */
static int loop_idle_ms = 1000;
static int loop_max_run = 64;  /* requests answered in a row before trio gets a turn */
static int c_only;             /* processing a request on trial: Python must not run it */
static int needs_python;       /* ...and it turned out to need Python */
static unsigned char c_try[64]; /* opcodes whose handler is one of our wrappers */
static unsigned long long loop_stats[2]; /* requests answered in the loop; handed back */
static int loop_yielded;       /* it returned for trio's sake: fastwait must go to trio */

/* A wrapper's way to Python: on trial (c_only) nothing is run and nothing is sent;
 * the request is freed and processed again, for real, by pyfuse3's loop. */
#define TO_PYTHON(req, call)                                                                \
    do {                                                                                    \
        if (c_only) {                                                                       \
            needs_python = 1;                                                               \
            fuse_reply_none(req);                                                           \
        } else {                                                                            \
            call;                                                                           \
        }                                                                                   \
    } while (0)

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    kernel_no_opendir = opendir_wrapped && (want_flags & SHIM_NO_OPENDIR) &&
                        (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT);
    /* passthrough needs OPEN: each open file is given its backing file in the reply */
    pt_going = pt_wanted && pt_offered && open_wrapped && (want_flags & SHIM_FASTPATH);
    kernel_no_open = open_wrapped && (want_flags & SHIM_NO_OPEN) && !pt_going &&
                     (conn->capable & FUSE_CAP_NO_OPEN_SUPPORT);
    /* Without OPEN nobody would truncate for open(O_TRUNC) under atomic_o_trunc: let the
     * kernel send it as SETATTR(size=0) instead. */
    if (kernel_no_open)
        conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
    if ((want_flags & SHIM_CACHE_SYMLINKS) && (conn->capable & FUSE_CAP_CACHE_SYMLINKS)) {
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
        cache_symlinks_on = 1;
    }
    /* The C fast path's READ replies splice file pages into /dev/fuse instead of
     * reading them into a buffer and writing that (see shim_read).  Not SPLICE_MOVE:
     * that could take the pages out of the lower file's cache, which every container
     * made from the layer shares. */
    if ((want_flags & SHIM_FASTPATH) && (conn->capable & FUSE_CAP_SPLICE_WRITE)) {
        conn->want |= FUSE_CAP_SPLICE_WRITE;
        splice_write_on = 1;
    }
    /* Plain READDIR for listings (see shim_readdir).  pyfuse3's init turns the flag
     * off (it has no READDIR handler), so it is set again after that. */
    rd_plain_on = fp_on && rd_cb && opendir_wrapped && (conn->capable & FUSE_CAP_READDIRPLUS) &&
                  (conn->capable & FUSE_CAP_READDIRPLUS_AUTO);
    /* last: pyfuse3's handler calls Operations.init(), which may read status() */
    if (real_ops.init)
        real_ops.init(userdata, conn);
    if (rd_plain_on)
        conn->want |= FUSE_CAP_READDIRPLUS | FUSE_CAP_READDIRPLUS_AUTO;
    if (pt_going) { /* (the INIT reply is amended again on its way out: io_writev) */
        conn->want &= ~FUSE_CAP_WRITEBACK_CACHE;
        /* O_TRUNC comes with the OPEN: a lower file is then copied up without data */
        if (conn->capable & FUSE_CAP_ATOMIC_O_TRUNC)
            conn->want |= FUSE_CAP_ATOMIC_O_TRUNC;
    }
}

static void shim_opendir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (kernel_no_opendir) {
        opendir_enosys_sent = 1;
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if (want_flags & SHIM_NO_OPENDIR) {
        fi->cache_readdir = 1;
        fi->keep_cache = 1;
    }
    real_ops.opendir(req, ino, fi);
}

static void tag_fh(fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fi && fi->fh == 0)
        fi->fh = (uint64_t)ino | INO_TAG;
}

static void shim_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (kernel_no_open) {
        open_enosys_sent = 1;
        fuse_reply_err(req, ENOSYS);
        return;
    }
    if (pt_on && fp_on) {
        /* an inode whose backing the daemon has set, on an fd that allows the access:
         * the reply is the one Python would send (the backing is added in io_writev) */
        struct pt_ent *e = tab_get(&pt_tab, ino);
        struct fp_ent *f = fp_get(ino);
        int acc = fi->flags & O_ACCMODE;
        int backed = e && e->bid > 0 && (e->opens == 0 || e->open_bid == e->bid) && f &&
                     (f->flags & (acc == O_RDONLY ? FP_READ : FP_WRITE));
        int cached = !backed && acc == O_RDONLY && f && (f->flags & FP_CACHED_OPEN) &&
                     !(e && e->opens > 0 && e->open_bid > 0);
        if ((backed || cached) && !(fi->flags & O_TRUNC)) {
            fi->fh = (uint64_t)ino | INO_TAG;
            fi->keep_cache = cached;
            fi->direct_io = 0;
            fp_stats[FPS_OPEN]++;
            fuse_reply_open(req, fi);
            return;
        }
    }
    TO_PYTHON(req, real_ops.open(req, ino, fi));
}

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    struct fp_ent *e = fi ? fp_for(ino, fi, FP_READ) : NULL;
    if (e) {
        struct fuse_bufvec buf = FUSE_BUFVEC_INIT(size);
        buf.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
        buf.buf[0].fd = e->fd;
        buf.buf[0].pos = off;
        fp_stats[FPS_READ]++;
        FP_NOGIL_IF(size >= FP_NOGIL_MIN, fuse_reply_data(req, &buf, 0));
        return;
    }
    TO_PYTHON(req, real_ops.read(req, ino, size, off, fi));
}

static void shim_write(fuse_req_t req, fuse_ino_t ino, const char *buf, size_t size, off_t off,
                       struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.write(req, ino, buf, size, off, fi);
}

static void shim_write_buf(fuse_req_t req, fuse_ino_t ino, struct fuse_bufvec *bufv, off_t off,
                           struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    struct fp_ent *e = fi ? fp_for(ino, fi, FP_WRITE) : NULL;
    if (e) {
        size_t size = fuse_buf_size(bufv);
        struct fuse_bufvec out = FUSE_BUFVEC_INIT(size);
        ssize_t res;
        out.buf[0].flags = FUSE_BUF_IS_FD | FUSE_BUF_FD_SEEK;
        out.buf[0].fd = e->fd;
        out.buf[0].pos = off;
        fp_stats[FPS_WRITE]++;
        FP_NOGIL_IF(size >= FP_NOGIL_MIN, res = fuse_buf_copy(&out, bufv, 0));
        if (res < 0)
            fuse_reply_err(req, (int)-res);
        else
            fuse_reply_write(req, (size_t)res);
        return;
    }
    TO_PYTHON(req, real_ops.write_buf(req, ino, bufv, off, fi));
}

static void shim_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.flush(req, ino, fi);
}

static void shim_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    if (fp_on && fi && fi->fh == ((uint64_t)ino | INO_TAG)) {
        /* a file opened on the daemon's cached fd (or created while the kernel does
         * not open): the daemon holds no handle of its own */
        if (pt_on)
            pt_unopen(ino, (uint32_t)fi->flags);
        fp_stats[FPS_RELEASE]++;
        fuse_reply_err(req, 0);
        return;
    }
    TO_PYTHON(req, real_ops.release(req, ino, fi));
}

static void shim_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.fsync(req, ino, datasync, fi);
}

#define FP_SETATTR_TIMES                                                                    \
    (FUSE_SET_ATTR_ATIME | FUSE_SET_ATTR_MTIME | FUSE_SET_ATTR_ATIME_NOW | FUSE_SET_ATTR_MTIME_NOW)
#define FP_SETATTR_OK                                                                       \
    (FUSE_SET_ATTR_MODE | FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID | FUSE_SET_ATTR_SIZE |        \
     FP_SETATTR_TIMES | FUSE_SET_ATTR_CTIME)

/* what the daemon's _make_entry would change in a stat of the real file */
static inline void fp_fix_attr(const struct fp_ent *e, fuse_ino_t ino, struct stat *st)
{
    st->st_ino = ino;
    if (e->flags & FP_NLINK0)
        st->st_nlink = 0;
    else if (e->flags & FP_NLINK1)
        st->st_nlink = 1;
}

/* the attribute timeout for *ino* (shorter while a file is open on it for writing) */
static inline double fp_attr_timeout(fuse_ino_t ino)
{
    if (pt_on) {
        struct pt_ent *e = tab_get(&pt_tab, ino);
        if (e && e->writers > 0 && fp_timeout > PT_WRITER_ATTR_TIMEOUT)
            return PT_WRITER_ATTR_TIMEOUT;
    }
    return fp_timeout;
}

static void shim_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    struct fp_ent *e;
    if (!(to_set & ~FP_SETATTR_OK) && (e = fp_for(ino, NULL, FP_ATTR | FP_SETATTR | FP_WRITE))) {
        int fd = e->fd, err = 0;
        struct stat st;
        if ((to_set & FUSE_SET_ATTR_SIZE) && ftruncate(fd, attr->st_size) < 0)
            err = errno;
        if (!err && (to_set & (FUSE_SET_ATTR_UID | FUSE_SET_ATTR_GID)) &&
            fchown(fd, (to_set & FUSE_SET_ATTR_UID) ? attr->st_uid : (uid_t)-1,
                   (to_set & FUSE_SET_ATTR_GID) ? attr->st_gid : (gid_t)-1) < 0)
            err = errno;
        if (!err && (to_set & FUSE_SET_ATTR_MODE) && fchmod(fd, attr->st_mode & 07777) < 0)
            err = errno;
        if (!err && (to_set & FP_SETATTR_TIMES)) {
            struct timespec ts[2];
            ts[0] = attr->st_atim;
            ts[1] = attr->st_mtim;
            if (!(to_set & FUSE_SET_ATTR_ATIME))
                ts[0].tv_nsec = (to_set & FUSE_SET_ATTR_ATIME_NOW) ? UTIME_NOW : UTIME_OMIT;
            if (!(to_set & FUSE_SET_ATTR_MTIME))
                ts[1].tv_nsec = (to_set & FUSE_SET_ATTR_MTIME_NOW) ? UTIME_NOW : UTIME_OMIT;
            if (futimens(fd, ts) < 0)
                err = errno;
        }
        if (!err && fstat(fd, &st) < 0)
            err = errno;
        fp_stats[FPS_SETATTR]++;
        if (err) {
            fuse_reply_err(req, err);
            return;
        }
        fp_fix_attr(e, ino, &st);
        fuse_reply_attr(req, &st, fp_attr_timeout(ino));
        return;
    }
    TO_PYTHON(req, real_ops.setattr(req, ino, attr, to_set, fi));
}

static void shim_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    struct fp_ent *e = fp_for(ino, NULL, FP_ATTR);
    struct stat st;
    if (e && fstat(e->fd, &st) == 0) {
        fp_stats[FPS_GETATTR]++;
        fp_fix_attr(e, ino, &st);
        fuse_reply_attr(req, &st, fp_attr_timeout(ino));
        return;
    }
    TO_PYTHON(req, real_ops.getattr(req, ino, fi));
}

/* A name missing from a directory that has no lower layer is missing from the union:
 * answer the negative entry here (the kernel asks before every create and rename).
 * Whatever exists (a file, a whiteout) and any odd name goes to the daemon. */
static void shim_lookup(fuse_req_t req, fuse_ino_t parent, const char *name)
{
    struct fp_ent *e = fp_for(parent, NULL, FP_UPPERONLY);
    struct stat st;
    if (e && name[0] && strncmp(name, ".wh.", 4) != 0 && strcmp(name, ".") != 0 &&
        strcmp(name, "..") != 0 && strlen(name) <= 255 &&
        fstatat(e->fd, name, &st, AT_SYMLINK_NOFOLLOW) < 0 && errno == ENOENT) {
        struct fuse_entry_param ep;
        memset(&ep, 0, sizeof(ep));
        ep.entry_timeout = fp_timeout;
        fp_stats[FPS_LOOKUP]++;
        fuse_reply_entry(req, &ep);
        return;
    }
    TO_PYTHON(req, real_ops.lookup(req, parent, name));
}

static void shim_getxattr(fuse_req_t req, fuse_ino_t ino, const char *name, size_t size)
{
    if (fp_on && strcmp(name, "security.capability") == 0 && fp_for(ino, NULL, FP_NOCAPS)) {
        fp_stats[FPS_GETXATTR]++;
        fuse_reply_err(req, ENODATA);
        return;
    }
    TO_PYTHON(req, real_ops.getxattr(req, ino, name, size));
}

/* Plain READDIR: the kernel asks for it (with READDIRPLUS_AUTO) when nothing looked up
 * a name of the directory since its last READDIRPLUS.  The daemon's callable returns
 * whole fuse_dirent records (at most *size* bytes; empty at the end) or an errno. */
static void shim_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    if (rd_plain_on && rd_cb) {
        PyObject *r = PyObject_CallFunction(rd_cb, "KnL", (unsigned long long)ino,
                                            (Py_ssize_t)size, (long long)off);
        if (!r) {
            PyErr_WriteUnraisable(rd_cb);
            fuse_reply_err(req, EIO);
            return;
        }
        if (PyBytes_Check(r) && (size_t)PyBytes_GET_SIZE(r) <= size) {
            fp_stats[FPS_READDIR]++;
            fuse_reply_buf(req, PyBytes_AS_STRING(r), (size_t)PyBytes_GET_SIZE(r));
        } else {
            long err = PyLong_Check(r) ? PyLong_AsLong(r) : 0;
            if (err <= 0 || err > 4095) {
                PyErr_Clear();
                err = EIO;
            }
            fuse_reply_err(req, (int)err);
        }
        Py_DECREF(r);
        return;
    }
    if (real_ops.readdir)
        TO_PYTHON(req, real_ops.readdir(req, ino, size, off, fi));
    else
        fuse_reply_err(req, ENOSYS);
}

static void shim_readdirplus(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                             struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.readdirplus(req, ino, size, off, fi);
}

static void shim_fsyncdir(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.fsyncdir(req, ino, datasync, fi);
}

static void shim_releasedir(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    if (fi && (fi->fh & INO_TAG)) { /* never opened by pyfuse3: nothing to release */
        fuse_reply_err(req, 0);
        return;
    }
    real_ops.releasedir(req, ino, fi);
}

/* FALLOCATE and LSEEK (SEEK_DATA/SEEK_HOLE): pyfuse3 has no handler for either (the
 * kernel would get ENOSYS and answer EOPNOTSUPP / treat the file as all data).  On a
 * file the table has an fd for, they run on that fd here; otherwise the daemon's
 * callable (fileops_enable) does: fo_cb(op, ino, fh, a, b, c) -> result >= 0 or -errno,
 * op 0: fallocate(mode=a, off=b, len=c) returns 0; op 1: lseek(off=a, whence=b) returns
 * the offset, or FO_PENDING to answer later (fileop_reply).  Never ENOSYS (that would turn them off for the whole mount). */
static PyObject *fo_cb;
#define FO_PENDING (1LL << 62) /* the daemon answers later, with fileop_reply(req, ...) */

static long long fo_call(fuse_req_t req, int op, fuse_ino_t ino, struct fuse_file_info *fi,
                         long long a, long long b, long long c)
{
    if (!fo_cb)
        return op == 0 ? -EOPNOTSUPP : -EINVAL;
    PyObject *r = PyObject_CallFunction(fo_cb, "iKKLLLK", op, (unsigned long long)ino,
                                        (unsigned long long)(fi ? fi->fh : 0), a, b, c,
                                        (unsigned long long)(uintptr_t)req);
    if (!r) {
        PyErr_WriteUnraisable(fo_cb);
        return -EIO;
    }
    long long v = PyLong_AsLongLong(r);
    Py_DECREF(r);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -EIO;
    }
    return v;
}

static void shim_fallocate(fuse_req_t req, fuse_ino_t ino, int mode, off_t off, off_t len,
                           struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    struct fp_ent *e = fi ? fp_for(ino, fi, FP_WRITE) : NULL;
    long long r;
    if (e)
        r = fallocate(e->fd, mode, off, len) < 0 ? -errno : 0;
    else
        r = fo_call(req, 0, ino, fi, mode, off, len);
    if (r == FO_PENDING)
        return;
    if (r == -ENOSYS)
        r = -EOPNOTSUPP;
    fuse_reply_err(req, r < 0 ? (int)-r : 0);
}

static void shim_lseek(fuse_req_t req, fuse_ino_t ino, off_t off, int whence,
                       struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    struct fp_ent *e = fi ? fp_for(ino, fi, FP_READ) : NULL;
    long long r;
    if (e) {
        r = lseek(e->fd, off, whence);
        if (r < 0)
            r = -errno;
    } else {
        r = fo_call(req, 1, ino, fi, off, whence, 0);
    }
    if (r == FO_PENDING)
        return;
    if (r == -ENOSYS)
        r = -EINVAL;
    if (r < 0)
        fuse_reply_err(req, (int)-r);
    else
        fuse_reply_lseek(req, (off_t)r);
}

struct fuse_session *fuse_session_new(struct fuse_args *args, const struct fuse_lowlevel_ops *op,
                                      size_t op_size, void *userdata)
{
    static session_new_fn real_new;
    if (!real_new) {
        real_new = (session_new_fn)dlvsym(RTLD_NEXT, "fuse_session_new", "FUSE_3.0");
        if (!real_new)
            real_new = (session_new_fn)dlsym(RTLD_NEXT, "fuse_session_new");
        if (!real_new)
            return NULL;
    }
    opendir_wrapped = open_wrapped = fastpath_wrapped = 0;
    memset(&real_ops, 0, sizeof(real_ops));
    memcpy(&real_ops, op, op_size < sizeof(real_ops) ? op_size : sizeof(real_ops));
    our_ops = real_ops;
    if (want_flags) {
        our_ops.init = shim_init;
        if (!real_ops.fallocate)
            our_ops.fallocate = shim_fallocate;
        if (!real_ops.lseek)
            our_ops.lseek = shim_lseek;
        if ((want_flags & SHIM_NO_OPENDIR) && real_ops.opendir && real_ops.releasedir &&
            (real_ops.readdir || real_ops.readdirplus)) {
            our_ops.opendir = shim_opendir;
            opendir_wrapped = 1;
            our_ops.readdir = shim_readdir; /* pyfuse3 has none: see shim_readdir */
            if (real_ops.readdirplus)
                our_ops.readdirplus = shim_readdirplus;
            if (real_ops.fsyncdir)
                our_ops.fsyncdir = shim_fsyncdir;
            our_ops.releasedir = shim_releasedir;
        }
        if ((want_flags & SHIM_NO_OPEN) && real_ops.open && real_ops.read && real_ops.release &&
            real_ops.setattr && (real_ops.write || real_ops.write_buf)) {
            our_ops.open = shim_open;
            open_wrapped = 1;
            our_ops.read = shim_read;
            our_ops.release = shim_release;
            our_ops.setattr = shim_setattr;
            if (real_ops.write)
                our_ops.write = shim_write;
            if (real_ops.write_buf)
                our_ops.write_buf = shim_write_buf;
            if (real_ops.flush)
                our_ops.flush = shim_flush;
            if (real_ops.fsync)
                our_ops.fsync = shim_fsync;
        }
        if ((want_flags & SHIM_FASTPATH) && open_wrapped && real_ops.getattr &&
            real_ops.getxattr && real_ops.write_buf && real_ops.lookup) {
            /* (libfuse prefers write_buf) */
            our_ops.getattr = shim_getattr;
            our_ops.getxattr = shim_getxattr;
            our_ops.lookup = shim_lookup;
            fastpath_wrapped = 1;
        }
    }
    memset(c_try, 0, sizeof(c_try));
    if (fastpath_wrapped) {
        c_try[FUSE_LOOKUP] = c_try[FUSE_GETATTR] = c_try[FUSE_SETATTR] = 1;
        c_try[FUSE_READ] = c_try[FUSE_RELEASE] = c_try[FUSE_GETXATTR] = 1;
        c_try[FUSE_WRITE] = our_ops.write_buf == shim_write_buf;
        c_try[FUSE_READDIR] = our_ops.readdir == shim_readdir;
        c_try[FUSE_IOCTL] = !our_ops.ioctl; /* libfuse answers ENOSYS itself */
        c_try[FUSE_OPEN] = our_ops.open == shim_open && (want_flags & SHIM_PASSTHROUGH);
    }
    interposed = 1;
    return real_new(args, &our_ops, sizeof(our_ops), userdata);
}

/*
 * The C serve loop.  pyfuse3's worker goes around a Python loop for every request:
 * wait (fs/fastwait.py), fuse_session_receive_buf(), fuse_session_process_buf(), await
 * the handler's coroutine.  For a request answered here in C, all but the read and the
 * reply is overhead, paid in Python.  So our fuse_session_receive_buf() (pyfuse3 binds to
 * it as to fuse_session_new) keeps going while it can: it processes each request it
 * reads whose handler is one of our wrappers "on trial" (c_only), and if the wrapper
 * answered it in C, waits for the next one here (poll with the GIL released, on
 * /dev/fuse and trio's wakeup fd, as the fast wait does).  The first request that needs
 * Python is handed to pyfuse3 as if just read (the trial's fuse_req is freed unanswered
 * with fuse_reply_none; an INTERRUPT queued for it would be consumed by the trial, which
 * is moot while pyfuse3 handles no interrupts).  Back to pyfuse3 with -EINTR (its loop
 * just waits again) after loop_max_run requests, when the wakeup fd fires (a signal, a
 * thread's result), or after loop_idle_ms idle, and the fast wait then waits through
 * trio (loop_take_yield); never while the daemon is busy in threads.
 */
typedef int (*receive_buf_fn)(struct fuse_session *, struct fuse_buf *);
typedef void (*process_buf_fn)(struct fuse_session *, const struct fuse_buf *);

/* Adaptive spinning.  On a VM a sleeping thread takes tens of microseconds to wake on
 * another CPU, more than answering the request took: a client that issues requests one
 * after another (open, fstat, read...) pays that twice per round trip.  So after a reply
 * the daemon first polls without sleeping for up to spin_cur_us; a request that comes
 * in meanwhile is read at once.  The window is reset to spin_max_us whenever the last
 * wait ended within it, and halves after each wait that did not (so an idle daemon
 * stops spinning after a few hundred microseconds in all). */
static int spin_max_us = 0, spin_cur_us = 0;
static unsigned long long spin_stats[2]; /* waits that a spin caught; waits that slept */

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* poll *p* (n fds) for up to timeout_ms, spinning first; call without the GIL */
static int spin_poll(struct pollfd *p, int n, int timeout_ms)
{
    int r = 0;
    uint64_t t0 = now_ns();
    if (spin_cur_us > 0) {
        uint64_t end = t0 + (uint64_t)spin_cur_us * 1000u;
        do
            r = poll(p, n, 0);
        while (r == 0 && now_ns() < end);
        if (r != 0) { /* a request, a wake-up, or an error (EINTR) */
            spin_stats[0] += r > 0;
            spin_cur_us = spin_max_us;
            return r;
        }
    }
    r = poll(p, n, timeout_ms);
    spin_stats[1]++;
    if (spin_max_us > 0) {
        if (now_ns() - t0 <= (uint64_t)spin_max_us * 1000u)
            spin_cur_us = spin_max_us;
        else
            spin_cur_us /= 2;
    }
    return r;
}

static int loop_wait(int fd)
{
    struct pollfd p[2] = {{fd, POLLIN, 0}, {loop_wake_fd, POLLIN, 0}};
    int r;
    Py_BEGIN_ALLOW_THREADS r = spin_poll(p, 2, loop_idle_ms);
    Py_END_ALLOW_THREADS
    return r > 0 && p[0].revents == POLLIN && !p[1].revents;
}

int fuse_session_receive_buf(struct fuse_session *se, struct fuse_buf *buf)
{
    static receive_buf_fn real_receive;
    static process_buf_fn real_process;
    if (!real_receive) {
        real_receive = (receive_buf_fn)dlvsym(RTLD_NEXT, "fuse_session_receive_buf", "FUSE_3.0");
        real_process = (process_buf_fn)dlvsym(RTLD_NEXT, "fuse_session_process_buf", "FUSE_3.0");
        if (!real_receive)
            real_receive = (receive_buf_fn)dlsym(RTLD_NEXT, "fuse_session_receive_buf");
        if (!real_process)
            real_process = (process_buf_fn)dlsym(RTLD_NEXT, "fuse_session_process_buf");
        if (!real_receive)
            return -ENOSYS;
    }
    static int io_set;
    if (!io_set) {
        io_set = 1;
        if (pt_wanted) { /* before INIT is read: its reply is amended in io_writev */
            static const struct fuse_custom_io io = {io_writev, io_read, io_splice, io_splice};
            if (fuse_session_custom_io(se, &io, fuse_session_fd(se)) != 0)
                pt_wanted = 0;
        }
    }
    int res = real_receive(se, buf);
    if (res > 0)
        pt_note_request(se, buf, res);
    for (int n = 0; res > 0 && loop_on && real_process && !loop_busy; n++) {
        const struct fuse_in_header *in = buf->mem;
        if ((buf->flags & FUSE_BUF_IS_FD) || (size_t)res < sizeof(*in) || in->opcode >= 64 ||
            !c_try[in->opcode])
            return res; /* pyfuse3's */
        c_only = 1;
        needs_python = 0;
        real_process(se, buf);
        c_only = 0;
        if (needs_python) {
            loop_stats[1]++;
            return res; /* processed again by pyfuse3, for real */
        }
        loop_stats[0]++;
        if (n + 1 >= loop_max_run || !loop_wait(fuse_session_fd(se))) {
            loop_yielded = 1; /* the fast wait's next wait is trio's (loop_take_yield) */
            return -EINTR;    /* pyfuse3's loop waits again */
        }
        res = real_receive(se, buf);
        if (res > 0)
            pt_note_request(se, buf, res);
    }
    return res;
}

/* -- Python side ------------------------------------------------------------------- */

static PyObject *py_configure(PyObject *self, PyObject *args)
{
    unsigned int flags;
    int depth = 1;
    if (!PyArg_ParseTuple(args, "I|i", &flags, &depth))
        return NULL;
    if (depth < 1 || depth > 2) {
        PyErr_SetString(PyExc_ValueError, "stack depth must be 1 or 2");
        return NULL;
    }
    want_flags = flags;
    pt_wanted = !!(flags & SHIM_PASSTHROUGH);
    pt_depth = depth;
    Py_RETURN_NONE;
}

static PyObject *py_status(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O,s:O}",
                         "passthrough", (pt_on || pt_going) ? Py_True : Py_False,
                         "passthrough_wanted", pt_wanted ? Py_True : Py_False,
                         "passthrough_offered", pt_offered ? Py_True : Py_False,
                         "fastpath", fp_on ? Py_True : Py_False,
                         "readdir_plain", rd_plain_on ? Py_True : Py_False,
                         "splice_write", splice_write_on ? Py_True : Py_False,
                         "interposed", interposed ? Py_True : Py_False,
                         "no_opendir", kernel_no_opendir ? Py_True : Py_False,
                         "opendir_enosys_sent", opendir_enosys_sent ? Py_True : Py_False,
                         "no_open", kernel_no_open ? Py_True : Py_False,
                         "open_enosys_sent", open_enosys_sent ? Py_True : Py_False,
                         "cache_symlinks", cache_symlinks_on ? Py_True : Py_False);
}

static PyObject *py_fp_enable(PyObject *self, PyObject *args)
{
    double timeout;
    PyObject *cb = Py_None;
    if (!PyArg_ParseTuple(args, "d|O", &timeout, &cb))
        return NULL;
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "readdir answerer must be callable");
        return NULL;
    }
    if (!fastpath_wrapped)
        Py_RETURN_FALSE;
    Py_XDECREF(rd_cb);
    rd_cb = NULL;
    if (cb != Py_None) {
        Py_INCREF(cb);
        rd_cb = cb;
    }
    fp_timeout = timeout;
    fp_on = 1;
    Py_RETURN_TRUE;
}

static PyObject *py_fileops_enable(PyObject *self, PyObject *args)
{
    PyObject *cb;
    if (!PyArg_ParseTuple(args, "O", &cb))
        return NULL;
    if (cb != Py_None && !PyCallable_Check(cb)) {
        PyErr_SetString(PyExc_TypeError, "fileops answerer must be callable");
        return NULL;
    }
    Py_XDECREF(fo_cb);
    fo_cb = NULL;
    if (cb != Py_None) {
        Py_INCREF(cb);
        fo_cb = cb;
    }
    Py_RETURN_NONE;
}

static PyObject *py_fileop_reply(PyObject *self, PyObject *args)
{
    unsigned long long req;
    int op;
    long long r;
    if (!PyArg_ParseTuple(args, "KiL", &req, &op, &r))
        return NULL;
    if (r == -ENOSYS)
        r = op == 0 ? -EOPNOTSUPP : -EINVAL;
    if (r < 0)
        fuse_reply_err((fuse_req_t)(uintptr_t)req, (int)-r);
    else if (op == 0)
        fuse_reply_err((fuse_req_t)(uintptr_t)req, 0);
    else
        fuse_reply_lseek((fuse_req_t)(uintptr_t)req, (off_t)r);
    Py_RETURN_NONE;
}

static PyObject *py_fp_set(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int fd;
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "KiI", &ino, &fd, &flags))
        return NULL;
    if (ino == 0 || ino == TAB_TOMB || (ino & INO_TAG) || fd < 0) {
        PyErr_SetString(PyExc_ValueError, "bad inode or fd");
        return NULL;
    }
    if (!flags) {
        fp_del(ino);
        Py_RETURN_NONE;
    }
    if (fp_put(ino, fd, flags) < 0)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_fp_clear(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "K", &ino))
        return NULL;
    fp_del(ino);
    Py_RETURN_NONE;
}

static PyObject *py_fp_get(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "K", &ino))
        return NULL;
    struct fp_ent *e = fp_get(ino);
    if (!e)
        Py_RETURN_NONE;
    return Py_BuildValue("(iI)", e->fd, e->flags);
}

static PyObject *py_fp_stats(PyObject *self, PyObject *noargs)
{
    static const char *const loop_names[6] = {"in_loop", "handed_back", "spin_caught", "slept",
                                              "pt_opens", "pt_ids_closed"};
    PyObject *d = PyDict_New();
    if (!d)
        return NULL;
    for (int i = 0; i < FPS_N + 7; i++) {
        unsigned long long n = i < FPS_N      ? fp_stats[i]
                               : i < FPS_N + 2 ? loop_stats[i - FPS_N]
                               : i < FPS_N + 4 ? spin_stats[i - FPS_N - 2]
                               : i < FPS_N + 6 ? pt_stats[i - FPS_N - 4]
                                               : (unsigned long long)fp_tab.live;
        const char *name = i < FPS_N ? fp_stat_names[i] : i < FPS_N + 6 ? loop_names[i - FPS_N] : "entries";
        PyObject *v = PyLong_FromUnsignedLongLong(n);
        if (!v || PyDict_SetItemString(d, name, v) < 0) {
            Py_XDECREF(v);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(v);
    }
    return d;
}

static PyObject *py_loop_enable(PyObject *self, PyObject *args)
{
    int wake_fd, idle_ms, max_run;
    if (!PyArg_ParseTuple(args, "iii", &wake_fd, &idle_ms, &max_run))
        return NULL;
    if (!fp_on || !interposed || wake_fd < 0 || max_run < 1)
        Py_RETURN_FALSE;
    loop_wake_fd = wake_fd;
    loop_idle_ms = idle_ms;
    loop_max_run = max_run;
    loop_on = 1;
    Py_RETURN_TRUE;
}

static PyObject *py_wait(PyObject *self, PyObject *args)
{
    int fd, wake_fd, timeout_ms, r;
    if (!PyArg_ParseTuple(args, "iii", &fd, &wake_fd, &timeout_ms))
        return NULL;
    struct pollfd p[2] = {{fd, POLLIN, 0}, {wake_fd, POLLIN, 0}};
    Py_BEGIN_ALLOW_THREADS r = spin_poll(p, 2, timeout_ms);
    Py_END_ALLOW_THREADS
    if (r < 0 && errno != EINTR)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyBool_FromLong(r > 0 && p[0].revents == POLLIN && !p[1].revents);
}

static PyObject *py_set_spin(PyObject *self, PyObject *args)
{
    int us;
    if (!PyArg_ParseTuple(args, "i", &us))
        return NULL;
    if (us < 0 || us > 100000) {
        PyErr_SetString(PyExc_ValueError, "spin must be 0..100000 microseconds");
        return NULL;
    }
    spin_max_us = spin_cur_us = us;
    Py_RETURN_NONE;
}

static PyObject *py_backing_open(PyObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    if (!pt_on || pt_fd < 0) {
        errno = EOPNOTSUPP;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    struct fuse_backing_map_ map = {fd, 0, 0};
    int id = ioctl(pt_fd, FUSE_DEV_IOC_BACKING_OPEN_, &map);
    if (id < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(id);
}

static struct pt_ent *pt_arg(PyObject *args)
{
    unsigned long long ino;
    if (!PyArg_ParseTuple(args, "K", &ino))
        return NULL;
    return tab_get(&pt_tab, ino);
}

static PyObject *py_pt_set(PyObject *self, PyObject *args)
{
    unsigned long long ino;
    int bid;
    if (!PyArg_ParseTuple(args, "Ki", &ino, &bid))
        return NULL;
    struct pt_ent *e = tab_put(&pt_tab, ino);
    if (!e)
        return PyErr_NoMemory();
    e->bid = bid;
    Py_RETURN_NONE;
}

static PyObject *py_pt_state(PyObject *self, PyObject *args)
{
    struct pt_ent *e = pt_arg(args);
    if (PyErr_Occurred())
        return NULL;
    if (!e)
        Py_RETURN_NONE;
    return Py_BuildValue("(iii)", e->bid, e->open_bid, e->opens);
}

/* the inode's data moved (copy-up): its backing is no longer current */
static PyObject *py_pt_retire(PyObject *self, PyObject *args)
{
    struct pt_ent *e = pt_arg(args);
    if (PyErr_Occurred())
        return NULL;
    if (e && e->bid > 0) {
        if (!(e->opens > 0 && e->open_bid == e->bid))
            pt_close_id(e->bid); /* else closed at the last release (pt_unopen) */
        e->bid = 0;
    }
    Py_RETURN_NONE;
}

/* the kernel forgot the inode: no file is open on it */
static PyObject *py_pt_drop(PyObject *self, PyObject *args)
{
    struct pt_ent *e = pt_arg(args);
    if (PyErr_Occurred())
        return NULL;
    if (e) {
        pt_close_id(e->bid);
        if (e->open_bid != e->bid)
            pt_close_id(e->open_bid);
        tab_del(&pt_tab, e);
    }
    Py_RETURN_NONE;
}

static PyObject *py_loop_take_yield(PyObject *self, PyObject *noargs)
{
    int y = loop_yielded;
    loop_yielded = 0;
    return PyBool_FromLong(y);
}

static PyObject *py_loop_busy(PyObject *self, PyObject *args)
{
    int busy;
    if (!PyArg_ParseTuple(args, "p", &busy))
        return NULL;
    loop_busy = busy;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fp_enable", py_fp_enable, METH_VARARGS,
     "fp_enable(attr_timeout, readdir=None) -> bool: answer table hits in C from now on;\n"
     "readdir(ino, size, off) -> bytes of fuse_dirent records, or an errno, answers plain\n"
     "READDIR (asked for at INIT only if given before it)"},
    {"fileops_enable", py_fileops_enable, METH_VARARGS,
     "fileops_enable(cb): cb(op, ino, fh, a, b, c) -> result or -errno answers FALLOCATE\n"
     "(op 0: mode, off, len) and LSEEK (op 1: off, whence) on files without a table fd;\n"
     "cb(..., req) may return FILEOP_PENDING (1 << 62) and answer later (fileop_reply)"},
    {"fileop_reply", py_fileop_reply, METH_VARARGS,
     "fileop_reply(req, op, result): answer a request cb returned FILEOP_PENDING for"},
    {"fp_set", py_fp_set, METH_VARARGS, "fp_set(ino, fd, flags): flags 0 removes the entry"},
    {"fp_clear", py_fp_clear, METH_VARARGS, "fp_clear(ino)"},
    {"fp_get", py_fp_get, METH_VARARGS, "fp_get(ino) -> (fd, flags) or None"},
    {"fp_stats", py_fp_stats, METH_NOARGS, "fp_stats() -> requests answered in C, by kind"},
    {"loop_enable", py_loop_enable, METH_VARARGS,
     "loop_enable(wake_fd, idle_ms, max_run) -> bool: serve C-answered requests in a C loop"},
    {"wait", py_wait, METH_VARARGS,
     "wait(fd, wake_fd, timeout_ms) -> bool: fd (and not wake_fd) became readable;\n"
     "spins first, as the C serve loop does (set_spin)"},
    {"set_spin", py_set_spin, METH_VARARGS,
     "set_spin(us): poll without sleeping for up to us microseconds before each wait (0: off)"},
    {"backing_open", py_backing_open, METH_VARARGS,
     "backing_open(fd) -> backing id for passthrough (OSError if refused)"},
    {"pt_set", py_pt_set, METH_VARARGS, "pt_set(ino, bid): the backing id opens of ino get"},
    {"pt_state", py_pt_state, METH_VARARGS, "pt_state(ino) -> (bid, open_bid, opens) or None"},
    {"pt_retire", py_pt_retire, METH_VARARGS,
     "pt_retire(ino): its data moved; its backing id is closed once no file uses it"},
    {"pt_drop", py_pt_drop, METH_VARARGS, "pt_drop(ino): the kernel forgot ino"},
    {"loop_busy", py_loop_busy, METH_VARARGS, "loop_busy(flag): threads are running: let trio wait"},
    {"loop_take_yield", py_loop_take_yield, METH_NOARGS,
     "loop_take_yield() -> bool: the C loop returned to give trio a turn (and clears that)"},
    {"configure", py_configure, METH_VARARGS, "configure(flags): features to use in the next session"},
    {"status", py_status, METH_NOARGS, "status() -> dict of the features in effect"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fuseshim",
    "Kernel FUSE caching features for pyfuse3 (see the C source for how).", -1, methods,
};

PyMODINIT_FUNC PyInit__fuseshim(void)
{
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    PyModule_AddIntConstant(m, "NO_OPENDIR", SHIM_NO_OPENDIR);
    PyModule_AddIntConstant(m, "CACHE_SYMLINKS", SHIM_CACHE_SYMLINKS);
    PyModule_AddIntConstant(m, "NO_OPEN", SHIM_NO_OPEN);
    PyModule_AddIntConstant(m, "FASTPATH", SHIM_FASTPATH);
    PyModule_AddIntConstant(m, "PASSTHROUGH", SHIM_PASSTHROUGH);
    PyModule_AddIntConstant(m, "FP_READ", FP_READ);
    PyModule_AddIntConstant(m, "FP_WRITE", FP_WRITE);
    PyModule_AddIntConstant(m, "FP_ATTR", FP_ATTR);
    PyModule_AddIntConstant(m, "FP_SETATTR", FP_SETATTR);
    PyModule_AddIntConstant(m, "FP_NOCAPS", FP_NOCAPS);
    PyModule_AddIntConstant(m, "FP_NLINK0", FP_NLINK0);
    PyModule_AddIntConstant(m, "FP_NLINK1", FP_NLINK1);
    PyModule_AddIntConstant(m, "FP_UPPERONLY", FP_UPPERONLY);
    PyModule_AddIntConstant(m, "FP_CACHED_OPEN", FP_CACHED_OPEN);
    PyModule_AddObject(m, "INO_TAG", PyLong_FromUnsignedLongLong(INO_TAG));
    return m;
}

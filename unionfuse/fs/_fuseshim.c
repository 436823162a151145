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
 *  - CACHE_SYMLINKS: readlink answers are cached by the kernel (symlinks never change
 *    in place; replacing one goes through us and drops the cache).
 *
 * status() reports what is in effect, so the daemon can log it and tests can check it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#define FUSE_USE_VERSION 34
#include <fuse_lowlevel.h>

#include <dlfcn.h>
#include <errno.h>
#include <string.h>

#define SHIM_NO_OPENDIR 1u
#define SHIM_CACHE_SYMLINKS 2u
#define SHIM_NO_OPEN 4u

#define INO_TAG (1ULL << 63) /* above every inode number (private ones start at 1<<62) */

static unsigned int want_flags;      /* what configure() asked for */
static int interposed;               /* our fuse_session_new ran */
static int kernel_no_opendir;        /* kernel supports NO_OPENDIR (set in INIT) */
static int opendir_enosys_sent;      /* we answered ENOSYS to an OPENDIR */
static int cache_symlinks_on;        /* FUSE_CAP_CACHE_SYMLINKS wanted and granted */
static int kernel_no_open;           /* kernel supports NO_OPEN (set in INIT) */
static int opendir_wrapped, open_wrapped; /* our wrappers are in the table */
static int open_enosys_sent;         /* we answered ENOSYS to an OPEN */

static struct fuse_lowlevel_ops real_ops; /* pyfuse3's table */
static struct fuse_lowlevel_ops our_ops;

typedef struct fuse_session *(*session_new_fn)(struct fuse_args *, const struct fuse_lowlevel_ops *,
                                               size_t, void *);

static void shim_init(void *userdata, struct fuse_conn_info *conn)
{
    kernel_no_opendir = opendir_wrapped && (want_flags & SHIM_NO_OPENDIR) &&
                        (conn->capable & FUSE_CAP_NO_OPENDIR_SUPPORT);
    kernel_no_open = open_wrapped && (want_flags & SHIM_NO_OPEN) &&
                     (conn->capable & FUSE_CAP_NO_OPEN_SUPPORT);
    /* Without OPEN nobody would truncate for open(O_TRUNC) under atomic_o_trunc: let the
     * kernel send it as SETATTR(size=0) instead. */
    if (kernel_no_open)
        conn->want &= ~FUSE_CAP_ATOMIC_O_TRUNC;
    if ((want_flags & SHIM_CACHE_SYMLINKS) && (conn->capable & FUSE_CAP_CACHE_SYMLINKS)) {
        conn->want |= FUSE_CAP_CACHE_SYMLINKS;
        cache_symlinks_on = 1;
    }
    /* last: pyfuse3's handler calls Operations.init(), which may read status() */
    if (real_ops.init)
        real_ops.init(userdata, conn);
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
    real_ops.open(req, ino, fi);
}

static void shim_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                      struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.read(req, ino, size, off, fi);
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
    real_ops.write_buf(req, ino, bufv, off, fi);
}

static void shim_flush(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.flush(req, ino, fi);
}

static void shim_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.release(req, ino, fi);
}

static void shim_fsync(fuse_req_t req, fuse_ino_t ino, int datasync, struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.fsync(req, ino, datasync, fi);
}

static void shim_setattr(fuse_req_t req, fuse_ino_t ino, struct stat *attr, int to_set,
                         struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.setattr(req, ino, attr, to_set, fi);
}

static void shim_readdir(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off,
                         struct fuse_file_info *fi)
{
    tag_fh(ino, fi);
    real_ops.readdir(req, ino, size, off, fi);
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
    opendir_wrapped = open_wrapped = 0;
    memset(&real_ops, 0, sizeof(real_ops));
    memcpy(&real_ops, op, op_size < sizeof(real_ops) ? op_size : sizeof(real_ops));
    our_ops = real_ops;
    if (want_flags) {
        our_ops.init = shim_init;
        if ((want_flags & SHIM_NO_OPENDIR) && real_ops.opendir && real_ops.releasedir &&
            (real_ops.readdir || real_ops.readdirplus)) {
            our_ops.opendir = shim_opendir;
            opendir_wrapped = 1;
            if (real_ops.readdir)
                our_ops.readdir = shim_readdir;
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
    }
    interposed = 1;
    return real_new(args, &our_ops, sizeof(our_ops), userdata);
}

/* -- Python side ------------------------------------------------------------------- */

static PyObject *py_configure(PyObject *self, PyObject *args)
{
    unsigned int flags;
    if (!PyArg_ParseTuple(args, "I", &flags))
        return NULL;
    want_flags = flags;
    Py_RETURN_NONE;
}

static PyObject *py_status(PyObject *self, PyObject *noargs)
{
    return Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O}",
                         "interposed", interposed ? Py_True : Py_False,
                         "no_opendir", kernel_no_opendir ? Py_True : Py_False,
                         "opendir_enosys_sent", opendir_enosys_sent ? Py_True : Py_False,
                         "no_open", kernel_no_open ? Py_True : Py_False,
                         "open_enosys_sent", open_enosys_sent ? Py_True : Py_False,
                         "cache_symlinks", cache_symlinks_on ? Py_True : Py_False);
}

static PyMethodDef methods[] = {
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
    PyModule_AddObject(m, "INO_TAG", PyLong_FromUnsignedLongLong(INO_TAG));
    return m;
}

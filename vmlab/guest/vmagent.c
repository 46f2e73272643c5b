/*
 * vmagent - the vmlab guest agent.
 *
 * Runs as PID 1 in the lesson guest (exec'd by /init) and serves the host over
 * a virtio-serial port named "org.vmlab.agent": a framed channel, not a shell on
 * a tty, so output is exact and exit statuses and durations are measured here.
 *
 * Frame (both directions): one ASCII header line, then a binary payload.
 *
 *     TYPE ID A B LEN1 LEN2\n<LEN1 + LEN2 bytes>
 *
 * Host -> guest
 *     RUN  id timeout_ms 0   cmdlen 0       run CMD as /bin/sh -c CMD would (stdin
 *                                            /dev/null; a plain command without the shell)
 *     KILL id 0 0 0 0                        SIGKILL the process group of run id
 *     PUT  id mode 0 pathlen datalen         write DATA to PATH (atomically)
 *     GET  id 0 0 pathlen 0                  read PATH
 *     PING id 0 0 0 0                        liveness check
 * Guest -> host
 *     HELLO 0 0 0 len 0                      once at start: "uname-release"
 *     OUT  id status dur_ns outlen errlen    result of RUN: status is the exit
 *                                            code, 128+signal, or -1 on timeout
 *     DATA id 0 0 len 0                      result of GET
 *     OK   id 0 0 0 0                        result of PUT / KILL
 *     PONG id monotonic_ns 0 0 0             answer to PING
 *     ERR  id errno 0 msglen 0               a request failed
 *     BYE  0 how 0 0 0                       the guest is shutting down
 *
 * As PID 1 it also reaps orphans, turns busybox poweroff/reboot/halt
 * (SIGUSR2/SIGTERM/SIGUSR1) and the ACPI power button (evdev KEY_POWER) into an
 * orderly shutdown: terminate processes, sync, unmount, reboot(2).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/input.h>
#include <poll.h>
#include <signal.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/signalfd.h>
#include <sys/stat.h>
#include <sys/utsname.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PORT_NAME "org.vmlab.agent"
#define MAX_JOBS 64
#define MAX_OUT (16u << 20)
#define MAX_EVDEV 8

struct buf { char *p; size_t len, cap; };

struct job {
    int used;
    long id;
    pid_t pid;
    int out_fd, err_fd;
    struct buf out, err;
    int exited, status, timed_out;
    uint64_t start_ns, end_ns, deadline_ns;
};

static int port = -1;
static struct job jobs[MAX_JOBS];
static int evfds[MAX_EVDEV];
static int n_ev;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void logc(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    int fd = open("/dev/console", O_WRONLY | O_NOCTTY);
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (fd >= 0) {
        dprintf(fd, "vmagent: %s\n", line);
        close(fd);
    }
}

static void buf_add(struct buf *b, const void *p, size_t n)
{
    if (b->len + n > MAX_OUT)
        n = MAX_OUT - b->len;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + n)
            cap *= 2;
        b->p = realloc(b->p, cap);
        if (!b->p) { logc("out of memory"); _exit(1); }
        b->cap = cap;
    }
    memcpy(b->p + b->len, p, n);
    b->len += n;
}

static void write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
    while (n) {
        ssize_t w = write(fd, c, n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                if (errno == EAGAIN) {
                    struct pollfd pf = { fd, POLLOUT, 0 };
                    poll(&pf, 1, 100);
                }
                continue;
            }
            return;  /* host gone: nothing useful to do with the frame */
        }
        c += w;
        n -= (size_t)w;
    }
}

static void send_frame(const char *type, long id, long long a, long long b,
                       const void *p1, size_t n1, const void *p2, size_t n2)
{
    char hdr[160];
    int h = snprintf(hdr, sizeof hdr, "%s %ld %lld %lld %zu %zu\n", type, id, a, b, n1, n2);
    /* one buffer, one write: frames never interleave */
    char *all = malloc((size_t)h + n1 + n2);
    if (!all) { logc("out of memory"); return; }
    memcpy(all, hdr, (size_t)h);
    if (n1) memcpy(all + h, p1, n1);
    if (n2) memcpy(all + h + n1, p2, n2);
    write_all(port, all, (size_t)h + n1 + n2);
    free(all);
}

static void send_err(long id, int err, const char *what)
{
    char msg[300];
    int n = snprintf(msg, sizeof msg, "%s: %s", what, strerror(err));
    send_frame("ERR", id, err, 0, msg, (size_t)n, NULL, 0);
}

static int find_port(char *path, size_t len)
{
    DIR *d = opendir("/sys/class/virtio-ports");
    struct dirent *e;
    int found = 0;
    if (!d)
        return 0;
    while (!found && (e = readdir(d))) {
        char fn[300], name[128] = "";
        FILE *f;
        if (e->d_name[0] == '.')
            continue;
        snprintf(fn, sizeof fn, "/sys/class/virtio-ports/%s/name", e->d_name);
        f = fopen(fn, "r");
        if (!f)
            continue;
        if (fgets(name, sizeof name, f)) {
            name[strcspn(name, "\n")] = 0;
            if (!strcmp(name, PORT_NAME)) {
                snprintf(path, len, "/dev/%s", e->d_name);
                found = 1;
            }
        }
        fclose(f);
    }
    closedir(d);
    return found;
}

static void open_power_buttons(void)
{
    DIR *d = opendir("/dev/input");
    struct dirent *e;
    if (!d)
        return;
    while ((e = readdir(d)) && n_ev < MAX_EVDEV) {
        char fn[300];
        unsigned long keys[(KEY_MAX + 1) / (8 * sizeof(long)) + 1];
        int fd;
        if (strncmp(e->d_name, "event", 5))
            continue;
        snprintf(fn, sizeof fn, "/dev/input/%s", e->d_name);
        fd = open(fn, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0)
            continue;
        memset(keys, 0, sizeof keys);
        if (ioctl(fd, EVIOCGBIT(EV_KEY, sizeof keys), keys) >= 0 &&
            (keys[KEY_POWER / (8 * sizeof(long))] >> (KEY_POWER % (8 * sizeof(long)))) & 1)
            evfds[n_ev++] = fd;
        else
            close(fd);
    }
    closedir(d);
}

static void unmount_all(void)
{
    /* unmount disk file systems, newest first, so their data is clean */
    char lines[64][256];
    int n = 0;
    FILE *f = fopen("/proc/mounts", "r");
    if (!f)
        return;
    while (n < 64 && fgets(lines[n], sizeof lines[n], f)) {
        if (!strncmp(lines[n], "/dev/", 5))
            n++;
    }
    fclose(f);
    while (n-- > 0) {
        char dev[256], dir[256];
        if (sscanf(lines[n], "%255s %255s", dev, dir) != 2)
            continue;
        if (umount(dir) < 0)
            mount(NULL, dir, NULL, MS_REMOUNT | MS_RDONLY, NULL);
    }
}

static void shutdown_now(int how, const char *why)
{
    int cmd = how == 1 ? RB_AUTOBOOT : how == 2 ? RB_HALT_SYSTEM : RB_POWER_OFF;
    uint64_t t0 = now_ns();
    logc("%s: %s", why, how == 1 ? "rebooting" : how == 2 ? "halting" : "powering off");
    send_frame("BYE", 0, how, 0, why, strlen(why), NULL, 0);
    kill(-1, SIGTERM);
    while (now_ns() - t0 < 500000000ull) {
        if (waitpid(-1, NULL, WNOHANG) < 0 && errno == ECHILD)
            break;
        usleep(10000);
    }
    kill(-1, SIGKILL);
    while (waitpid(-1, NULL, WNOHANG) > 0)
        ;
    sync();
    unmount_all();
    sync();
    reboot(cmd);
    logc("reboot(2) failed: %s", strerror(errno));
}

static struct job *job_by_id(long id)
{
    for (int i = 0; i < MAX_JOBS; i++)
        if (jobs[i].used && jobs[i].id == id)
            return &jobs[i];
    return NULL;
}

/* Plain commands: run as ash would run them, without the shell.
 *
 * A command that is only words of [A-Za-z0-9_./+,:=%@-] separated by spaces has no quoting, expansion,
 * redirection, comment or operator, so `sh -c CMD` runs one program with exactly those words. When the first
 * word is not an ash keyword, not an assignment and not a built-in (except true, false, echo and test, whose
 * built-ins call the same code as their applets), the agent execs that program itself the way ash would:
 *
 * - a word with a slash is the path;
 * - a busybox applet (the list /etc/vmlab/applets, written by the image builder) is run by busybox even where
 *   PATH has a file of that name (FEATURE_PREFER_APPLETS): exec its link in /bin, or /bin/sh with argv[0] the
 *   applet's name if /bin has no link to the same busybox;
 * - otherwise the first file of that name along PATH.
 *
 * The program gets what ash would pass on: SHLVL one more than the agent's, PWD and PATH exported (ash sets a
 * default PATH if there is none), and SIGQUIT ignored (ash ignores it and its commands inherit that). If the exec
 * fails for any reason but a missing file along PATH, or no file is found, the child execs `sh -c CMD` after all,
 * so every error (not found, permission denied, a script without #!) is ash's own. What differs: the order of the
 * variables in `env`, and a NOEXEC applet (ps, ...) shows up as itself rather than as `sh -c ps`.
 * One exec instead of busybox's shell start-up saved 0.3 ms of a 0.9 ms spawn here (docs/boot.md). */
#define APPLETS_FILE "/etc/vmlab/applets"
#define MAX_WORDS 63

static char **applets;          /* sorted; NULL: no list, so no plain commands */
static size_t n_applets;
static char **child_env;        /* the environment ash would give its commands */
static const char *child_path;  /* its PATH */
static char plain_buf[4096];
static char *plain_argv[MAX_WORDS + 1];

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static int is_applet(const char *w)
{
    return applets && bsearch(&w, applets, n_applets, sizeof *applets, cmp_str) != NULL;
}

static void load_applets(void)
{
    static const char *const env_from_ash[] = { "SHLVL", "PWD", "PATH" };
    FILE *f = fopen(APPLETS_FILE, "re");
    char line[128], cwd[4096], num[32];
    const char *pwd = getenv("PWD"), *shlvl = getenv("SHLVL"), *path = getenv("PATH");
    struct stat a, b;
    size_t n_env = 0, cap = 0, k = 0;
    if (!f)
        return;                 /* an image without the list: every command goes through the shell */
    while (fgets(line, sizeof line, f)) {
        line[strcspn(line, "\n")] = 0;
        if (!line[0])
            continue;
        if (n_applets == cap) {
            char **more = realloc(applets, (cap = cap ? 2 * cap : 512) * sizeof *applets);
            if (!more)
                break;
            applets = more;
        }
        if (!(applets[n_applets] = strdup(line)))
            break;
        n_applets++;
    }
    if (ferror(f) || !feof(f)) {
        logc("cannot load %s: every command goes through the shell", APPLETS_FILE);
        fclose(f);
        applets = NULL;
        return;
    }
    fclose(f);
    qsort(applets, n_applets, sizeof *applets, cmp_str);

    /* ash keeps PWD if it names the current directory, else sets it to getcwd() */
    if (!pwd || pwd[0] != '/' || stat(pwd, &a) < 0 || stat(".", &b) < 0 || a.st_dev != b.st_dev ||
        a.st_ino != b.st_ino)
        pwd = getcwd(cwd, sizeof cwd);
    snprintf(num, sizeof num, "%d", (shlvl ? atoi(shlvl) : 0) + 1);
    while (environ[n_env])
        n_env++;
    child_env = calloc(n_env + 4, sizeof *child_env);
    if (!child_env) {
        applets = NULL;
        return;
    }
    for (size_t i = 0; i < n_env; i++) {
        int from_ash = 0;
        for (size_t v = 0; v < sizeof env_from_ash / sizeof *env_from_ash; v++) {
            size_t l = strlen(env_from_ash[v]);
            from_ash |= !strncmp(environ[i], env_from_ash[v], l) && environ[i][l] == '=';
        }
        if (!from_ash)
            child_env[k++] = environ[i];
    }
    if (asprintf(&child_env[k++], "SHLVL=%s", num) < 0 ||
        (pwd && asprintf(&child_env[k++], "PWD=%s", pwd) < 0) ||
        asprintf(&child_env[k], "PATH=%s", path ? path : "/sbin:/usr/sbin:/bin:/usr/bin") < 0) {
        logc("out of memory");
        applets = NULL;
        return;
    }
    child_path = child_env[k] + 5;
}

/* Split CMD into plain_argv if it is a plain command (above); the number of words, or 0. */
static int plain_command(const char *cmd)
{
    static const char *const shell_words[] = {
        /* ash's keywords and built-ins (busybox 1.35 shell/ash.c), but true, false, echo and test */
        "!", ".", ":", "[", "[[", "alias", "bg", "break", "case", "cd", "chdir", "command", "continue", "do",
        "done", "elif", "else", "esac", "eval", "exec", "exit", "export", "fg", "fi", "for", "function",
        "getopts", "hash", "help", "history", "if", "in", "jobs", "kill", "let", "local", "printf", "pwd",
        "read", "readonly", "return", "set", "shift", "source", "then", "times", "trap", "type", "ulimit",
        "umask", "unalias", "until", "unset", "wait", "while", "{", "}",
    };
    size_t len = strlen(cmd);
    int argc = 0;
    char *p;
    if (!applets || !child_env || len >= sizeof plain_buf)
        return 0;
    for (const char *c = cmd; *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') ||
              strchr(" _./+,:=%@-", *c)))
            return 0;
    memcpy(plain_buf, cmd, len + 1);
    for (p = strtok(plain_buf, " "); p; p = strtok(NULL, " ")) {
        if (argc == MAX_WORDS)
            return 0;
        plain_argv[argc++] = p;
    }
    plain_argv[argc] = NULL;
    if (!argc || strchr(plain_argv[0], '='))
        return 0;
    for (size_t i = 0; i < sizeof shell_words / sizeof *shell_words; i++)
        if (!strcmp(plain_argv[0], shell_words[i]))
            return 0;
    /* the four built-ins are left to ash unless busybox has them as applets too */
    if ((!strcmp(plain_argv[0], "true") || !strcmp(plain_argv[0], "false") || !strcmp(plain_argv[0], "echo") ||
         !strcmp(plain_argv[0], "test")) && !is_applet(plain_argv[0]))
        return 0;
    return argc;
}

/* In the spawned child: exec a plain command as ash would; returns only if it could not. */
static void exec_plain(char **argv)
{
    const char *path = child_path;
    char file[4096];
    signal(SIGQUIT, SIG_IGN);
    if (strchr(argv[0], '/')) {
        execve(argv[0], argv, child_env);
    } else if (is_applet(argv[0])) {
        /* through its link if /bin has one, so the process is named after the applet (as busybox names it
         * when ash runs it through /proc/self/exe) */
        struct stat a, b;
        if (strlen(argv[0]) < sizeof file - 5 && stat("/bin/sh", &a) == 0) {
            snprintf(file, sizeof file, "/bin/%s", argv[0]);
            if (stat(file, &b) == 0 && a.st_dev == b.st_dev && a.st_ino == b.st_ino)
                execve(file, argv, child_env);
        }
        execve("/bin/sh", argv, child_env);
    } else {
        while (path) {
            const char *end = strchr(path, ':');
            size_t dl = end ? (size_t)(end - path) : strlen(path);
            if (dl + 1 + strlen(argv[0]) < sizeof file) {
                /* an empty entry is the current directory, as in ash */
                memcpy(file, dl ? path : ".", dl ? dl : 1);
                file[dl ? dl : 1] = '/';
                strcpy(file + (dl ? dl : 1) + 1, argv[0]);
                execve(file, argv, child_env);
                if (errno != ENOENT && errno != ENOTDIR)
                    break;
            }
            path = end ? end + 1 : NULL;
        }
    }
    signal(SIGQUIT, SIG_DFL);
}

/* Starting a command.
 *
 * Under TCG every switch of address space (a CR3 write) empties QEMU's software TLB and its cache of
 * translated-block lookups, which the code that runs next refills. posix_spawn cost 7 of them per
 * command; this costs 4-5 (into the new program, its stack moved by exec, its exit, back here), and a
 * loop of spawns inside one guest took 2.9 ms of QEMU CPU each instead of 3.5-3.7 (docs/boot.md,
 * "run() latency"):
 *
 * - clone(CLONE_VM | CLONE_VFORK) on a stack kept in the agent's memory, where posix_spawn maps a
 *   fresh stack for every child and unmaps it afterwards (page faults, and a TLB flush of the agent);
 * - the agent is SCHED_BATCH from just before the clone until it runs again: the child's exec wakes
 *   the vfork parent, and a normal parent would preempt it at once (two more switches); a batch task
 *   waits for the child to sleep, exit or use up its slice. The child goes back to SCHED_OTHER.
 *
 * The child is a vfork child: it shares the agent's memory, the agent is stopped until it execs or
 * exits, and it only makes system calls. Signal dispositions are those of a fresh process: SIGPIPE,
 * which the agent ignores, is default again (a reader that goes away ends `yes | head` as in any shell).
 */
struct spawn_args {
    const char *cmd;
    char **argv;             /* a plain command's words, or NULL: sh -c CMD */
    int out_fd, err_fd;
    int err;                 /* set by the child if it cannot exec */
};

static char spawn_stack[64 << 10] __attribute__((aligned(64)));

static int spawn_child(void *p)
{
    struct spawn_args *sa = p;
    char *argv[] = { "sh", "-c", (char *)sa->cmd, NULL };
    struct sched_param sp = { 0 };
    sigset_t none;
    int fd = open("/dev/null", O_RDONLY);
    if (fd < 0 || (fd != 0 && (dup2(fd, 0) < 0 || close(fd) < 0)) ||
        dup2(sa->out_fd, 1) < 0 || dup2(sa->err_fd, 2) < 0 || setsid() < 0 ||
        sched_setscheduler(0, SCHED_OTHER, &sp) < 0 || signal(SIGPIPE, SIG_DFL) == SIG_ERR)
        goto fail;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    if (sa->argv)
        exec_plain(sa->argv);
    execve("/bin/sh", argv, environ);
fail:
    sa->err = errno ? errno : EINVAL;
    _exit(127);
}

/* Start CMD (plain, or /bin/sh -c CMD) with stdin /dev/null, stdout and stderr the pipes; 0 or an errno. */
static int spawn_shell(struct spawn_args *sa, pid_t *pid)
{
    struct sched_param sp = { 0 };
    sigset_t all, old;
    int batch, clone_errno;
    sigfillset(&all);
    sigprocmask(SIG_BLOCK, &all, &old);        /* no signal is taken on the child's stack */
    batch = sched_setscheduler(0, SCHED_BATCH, &sp) == 0;
    *pid = clone(spawn_child, spawn_stack + sizeof spawn_stack, CLONE_VM | CLONE_VFORK | SIGCHLD, sa);
    clone_errno = errno;
    if (batch)
        sched_setscheduler(0, SCHED_OTHER, &sp);
    sigprocmask(SIG_SETMASK, &old, NULL);
    if (*pid < 0)
        return clone_errno;
    if (sa->err) {
        waitpid(*pid, NULL, 0);
        return sa->err;
    }
    return 0;
}

static void start_job(long id, long timeout_ms, const char *cmd)
{
    struct job *j = NULL;
    int po[2], pe[2];
    for (int i = 0; i < MAX_JOBS && !j; i++)
        if (!jobs[i].used)
            j = &jobs[i];
    if (!j) {
        send_err(id, EAGAIN, "too many commands running");
        return;
    }
    if (pipe2(po, O_CLOEXEC) < 0 || pipe2(pe, O_CLOEXEC) < 0) {
        send_err(id, errno, "pipe");
        return;
    }
    memset(j, 0, sizeof *j);
    j->start_ns = now_ns();
    {
        struct spawn_args sa = { cmd, plain_command(cmd) ? plain_argv : NULL, po[1], pe[1], 0 };
        int err = spawn_shell(&sa, &j->pid);
        if (err) {
            send_err(id, err, "spawn /bin/sh");
            close(po[0]); close(po[1]); close(pe[0]); close(pe[1]);
            memset(j, 0, sizeof *j);
            return;
        }
    }
    close(po[1]);
    close(pe[1]);
    j->used = 1;
    j->id = id;
    j->out_fd = po[0];
    j->err_fd = pe[0];
    j->deadline_ns = timeout_ms > 0 ? j->start_ns + (uint64_t)timeout_ms * 1000000ull : 0;
}

static void finish_job_if_done(struct job *j)
{
    long long status;
    if (!j->used || !j->exited || j->out_fd >= 0 || j->err_fd >= 0)
        return;
    if (j->timed_out)
        status = -1;
    else if (WIFEXITED(j->status))
        status = WEXITSTATUS(j->status);
    else
        status = 128 + WTERMSIG(j->status);
    send_frame("OUT", j->id, status, (long long)(j->end_ns - j->start_ns),
               j->out.p, j->out.len, j->err.p, j->err.len);
    free(j->out.p);
    free(j->err.p);
    memset(j, 0, sizeof *j);
}

static void reap(void)
{
    int st;
    pid_t pid;
    while ((pid = waitpid(-1, &st, WNOHANG)) > 0) {
        for (int i = 0; i < MAX_JOBS; i++) {
            if (jobs[i].used && jobs[i].pid == pid && !jobs[i].exited) {
                jobs[i].exited = 1;
                jobs[i].status = st;
                jobs[i].end_ns = now_ns();
                finish_job_if_done(&jobs[i]);
            }
        }
    }
}

/* Copy a request's path into p (NUL-terminated); answer ERR and return 0 if it is unusable. */
static int take_path(long id, const char *path, size_t plen, char *p, size_t size)
{
    if (plen == 0 || plen >= size || memchr(path, 0, plen)) {
        send_err(id, EINVAL, "bad path");
        return 0;
    }
    memcpy(p, path, plen);
    p[plen] = 0;
    return 1;
}

static void do_put(long id, long mode, const char *path, size_t plen, const char *data, size_t dlen)
{
    char p[4096], tmp[4200];
    int fd;
    if (!take_path(id, path, plen, p, sizeof p))
        return;
    snprintf(tmp, sizeof tmp, "%s.vmlab-tmp", p);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode ? (mode_t)mode : 0644);
    if (fd < 0) {
        send_err(id, errno, p);
        return;
    }
    write_all(fd, data, dlen);
    if (fsync(fd) < 0 && errno != EINVAL) {
        int e = errno;
        close(fd);
        unlink(tmp);
        send_err(id, e, p);
        return;
    }
    close(fd);
    if (mode)
        chmod(tmp, (mode_t)mode);
    if (rename(tmp, p) < 0) {
        int e = errno;
        unlink(tmp);
        send_err(id, e, p);
        return;
    }
    send_frame("OK", id, 0, 0, NULL, 0, NULL, 0);
}

static void do_get(long id, const char *path, size_t plen)
{
    char p[4096];
    struct buf b = { 0 };
    char chunk[65536];
    ssize_t r;
    int fd;
    if (!take_path(id, path, plen, p, sizeof p))
        return;
    fd = open(p, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        send_err(id, errno, p);
        return;
    }
    while ((r = read(fd, chunk, sizeof chunk)) > 0)
        buf_add(&b, chunk, (size_t)r);
    close(fd);
    send_frame("DATA", id, 0, 0, b.p, b.len, NULL, 0);
    free(b.p);
}

static void handle_frame(const char *type, long id, long long a, const char *pay, size_t n1, size_t n2)
{
    if (!strcmp(type, "RUN")) {
        char *cmd = strndup(pay, n1);
        start_job(id, (long)a, cmd ? cmd : "");
        free(cmd);
    } else if (!strcmp(type, "KILL")) {
        struct job *j = job_by_id(id);
        if (j && !j->exited) {
            j->timed_out = 1;
            kill(-j->pid, SIGKILL);
        }
        send_frame("OK", id, 0, 0, NULL, 0, NULL, 0);
    } else if (!strcmp(type, "PUT")) {
        do_put(id, (long)a, pay, n1, pay + n1, n2);
    } else if (!strcmp(type, "GET")) {
        do_get(id, pay, n1);
    } else if (!strcmp(type, "PING")) {
        send_frame("PONG", id, (long long)now_ns(), 0, NULL, 0, NULL, 0);
    } else {
        send_err(id, EINVAL, "unknown request");
    }
}

/* Parse as many complete frames as the input buffer holds. */
static void parse_input(struct buf *in)
{
    size_t off = 0;
    for (;;) {
        char *nl = memchr(in->p + off, '\n', in->len - off);
        char type[16];
        long id;
        long long a, b;
        size_t n1, n2;
        if (!nl)
            break;
        *nl = 0;
        if (sscanf(in->p + off, "%15s %ld %lld %lld %zu %zu", type, &id, &a, &b, &n1, &n2) != 6) {
            logc("bad frame header, skipping: %.60s", in->p + off);
            off = (size_t)(nl - in->p) + 1;
            continue;
        }
        if ((size_t)(nl - in->p) + 1 + n1 + n2 > in->len) {
            *nl = '\n';  /* payload incomplete: wait for more */
            break;
        }
        handle_frame(type, id, a, nl + 1, n1, n2);
        off = (size_t)(nl - in->p) + 1 + n1 + n2;
    }
    memmove(in->p, in->p + off, in->len - off);
    in->len -= off;
}

int main(void)
{
    char path[300];
    struct utsname u;
    sigset_t mask;
    int sfd;
    struct buf in = { 0 };
    uint64_t t0 = now_ns();

    while (!find_port(path, sizeof path)) {
        if (now_ns() - t0 > 10000000000ull) {
            logc("no virtio-serial port named %s after 10 s; is virtio_console loaded?", PORT_NAME);
            if (getpid() == 1) {
                sync();
                reboot(RB_POWER_OFF);
            }
            return 1;
        }
        usleep(20000);
    }
    port = open(path, O_RDWR | O_CLOEXEC);
    if (port < 0) {
        logc("cannot open %s: %s", path, strerror(errno));
        return 1;
    }

    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigaddset(&mask, SIGTERM);
    sigaddset(&mask, SIGUSR1);
    sigaddset(&mask, SIGUSR2);
    sigaddset(&mask, SIGINT);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);
    signal(SIGPIPE, SIG_IGN);
    open_power_buttons();
    load_applets();

    uname(&u);
    send_frame("HELLO", 0, 0, 0, u.release, strlen(u.release), NULL, 0);
    logc("ready on %s (%d power button(s))", path, n_ev);

    for (;;) {
        struct pollfd pf[2 + MAX_EVDEV + 2 * MAX_JOBS];
        struct job *owner[2 + MAX_EVDEV + 2 * MAX_JOBS];
        int nf = 0, timeout = -1;
        uint64_t now = now_ns();

        pf[nf].fd = port; pf[nf].events = POLLIN; owner[nf++] = NULL;
        pf[nf].fd = sfd; pf[nf].events = POLLIN; owner[nf++] = NULL;
        for (int i = 0; i < n_ev; i++) {
            pf[nf].fd = evfds[i]; pf[nf].events = POLLIN; owner[nf++] = NULL;
        }
        for (int i = 0; i < MAX_JOBS; i++) {
            struct job *j = &jobs[i];
            if (!j->used)
                continue;
            if (j->out_fd >= 0) { pf[nf].fd = j->out_fd; pf[nf].events = POLLIN; owner[nf++] = j; }
            if (j->err_fd >= 0) { pf[nf].fd = j->err_fd; pf[nf].events = POLLIN; owner[nf++] = j; }
            if (j->deadline_ns && !j->exited) {
                if (now >= j->deadline_ns) {
                    j->timed_out = 1;
                    kill(-j->pid, SIGKILL);
                } else {
                    int ms = (int)((j->deadline_ns - now) / 1000000ull) + 1;
                    if (timeout < 0 || ms < timeout)
                        timeout = ms;
                }
            }
        }
        if (poll(pf, (nfds_t)nf, timeout) < 0) {
            if (errno == EINTR)
                continue;
            logc("poll: %s", strerror(errno));
            sleep(1);
            continue;
        }
        for (int k = 0; k < nf; k++) {
            if (!pf[k].revents)
                continue;
            if (pf[k].fd == port) {
                char chunk[65536];
                ssize_t r = read(port, chunk, sizeof chunk);
                if (r > 0) {
                    if (in.len + (size_t)r > in.cap) {
                        size_t cap = in.cap ? in.cap : 65536;
                        while (cap < in.len + (size_t)r)
                            cap *= 2;
                        in.p = realloc(in.p, cap);
                        in.cap = cap;
                    }
                    memcpy(in.p + in.len, chunk, (size_t)r);
                    in.len += (size_t)r;
                    parse_input(&in);
                } else if (r == 0 || (pf[k].revents & POLLHUP)) {
                    /* host side closed (e.g. between save and restore): wait */
                    usleep(50000);
                }
            } else if (pf[k].fd == sfd) {
                struct signalfd_siginfo si;
                while (read(sfd, &si, sizeof si) == sizeof si) {
                    if (si.ssi_signo == SIGCHLD)
                        reap();
                    else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT)
                        shutdown_now(1, "reboot requested in the guest");
                    else if (si.ssi_signo == SIGUSR1)
                        shutdown_now(2, "halt requested in the guest");
                    else if (si.ssi_signo == SIGUSR2)
                        shutdown_now(0, "poweroff requested in the guest");
                }
            } else if (owner[k]) {
                struct job *j = owner[k];
                char chunk[65536];
                ssize_t r = read(pf[k].fd, chunk, sizeof chunk);
                int is_out = pf[k].fd == j->out_fd;
                if (r > 0) {
                    buf_add(is_out ? &j->out : &j->err, chunk, (size_t)r);
                } else if (r == 0 || errno != EINTR) {
                    close(pf[k].fd);
                    if (is_out) j->out_fd = -1; else j->err_fd = -1;
                    finish_job_if_done(j);
                }
            } else {
                struct input_event ev;
                while (read(pf[k].fd, &ev, sizeof ev) == sizeof ev)
                    if (ev.type == EV_KEY && ev.code == KEY_POWER && ev.value == 1)
                        shutdown_now(0, "ACPI power button pressed");
            }
        }
    }
}

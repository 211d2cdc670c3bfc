// Floor for fan-out: the cheapest possible delivery of one ~150-byte frame
// to each of N loopback TCP sockets, one write() per socket per message (the
// syscall a WebSocket server cannot avoid when each member gets its message
// on its own). The parent (writer, meant for core 0) writes ROUNDS x N frames;
// a forked child (reader, meant for core 1) drains all sockets with epoll.
// Prints the writer's user+system CPU per write(), in microseconds.
// Build: gcc -O2 -o floor_write floor_write.c
// Usage: floor_write [sockets=100] [rounds=10000] [frame_bytes=150] [batch=1] [writer_cpu=0] [reader_cpu=1]
// batch = frames per write() (a server that has queued several frames for a
// member sends them in one writev; loopchat does up to 64).
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

static void pin(int cpu) { cpu_set_t s; CPU_ZERO(&s); CPU_SET(cpu, &s); sched_setaffinity(0, sizeof s, &s); }
static double cpu_s(void) {
    struct rusage u; getrusage(RUSAGE_SELF, &u);
    return u.ru_utime.tv_sec + u.ru_stime.tv_sec + (u.ru_utime.tv_usec + u.ru_stime.tv_usec) / 1e6;
}
static double user_s(void) { struct rusage u; getrusage(RUSAGE_SELF, &u); return u.ru_utime.tv_sec + u.ru_utime.tv_usec / 1e6; }

int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 100, rounds = argc > 2 ? atoi(argv[2]) : 10000;
    int len = argc > 3 ? atoi(argv[3]) : 150, batch = argc > 4 ? atoi(argv[4]) : 1;
    int wcpu = argc > 5 ? atoi(argv[5]) : 0, rcpu = argc > 6 ? atoi(argv[6]) : 1;
    if (n < 1 || rounds < 1 || len < 2 || batch < 1) { fprintf(stderr, "bad arguments\n"); return 2; }
    int lfd = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    socklen_t al = sizeof a;
    if (bind(lfd, (void *)&a, sizeof a) || listen(lfd, 1024) || getsockname(lfd, (void *)&a, &al)) { perror("listen"); return 1; }
    int *srv = calloc(n, sizeof(int)), *cli = calloc(n, sizeof(int));
    for (int i = 0; i < n; i++) {
        cli[i] = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(cli[i], (void *)&a, sizeof a)) { perror("connect"); return 1; }
        srv[i] = accept(lfd, NULL, NULL);
        setsockopt(srv[i], IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
    long long total = (long long)n * rounds * len * batch;
    pid_t child = fork();
    if (child == 0) { // reader
        pin(rcpu);
        int ep = epoll_create1(0);
        for (int i = 0; i < n; i++) {
            struct epoll_event e = {.events = EPOLLIN, .data.fd = cli[i]};
            epoll_ctl(ep, EPOLL_CTL_ADD, cli[i], &e);
        }
        static char buf[65536]; struct epoll_event ev[256]; long long got = 0;
        while (got < total) {
            int k = epoll_wait(ep, ev, 256, 5000);
            if (k <= 0) break;
            for (int j = 0; j < k; j++) { ssize_t r = read(ev[j].data.fd, buf, sizeof buf); if (r > 0) got += r; }
        }
        _exit(got == total ? 0 : 1);
    }
    pin(wcpu);
    char *frame = malloc((size_t)len * batch); memset(frame, 'x', (size_t)len * batch);
    double c0 = cpu_s(), u0 = user_s();
    long long writes = 0;
    for (int r = 0; r < rounds; r++)
        for (int i = 0; i < n; i++) {
            ssize_t w = write(srv[i], frame, (size_t)len * batch);
            if (w != (ssize_t)len * batch) { perror("write"); kill(child, SIGKILL); return 1; }
            writes++;
        }
    double c1 = cpu_s(), u1 = user_s();
    int st; waitpid(child, &st, 0);
    printf("{\"sockets\":%d,\"writes\":%lld,\"frame_bytes\":%d,\"batch\":%d,\"cpu_us_per_write\":%.3f,\"cpu_us_per_frame\":%.3f,\"user_us_per_write\":%.3f,\"reader_ok\":%s}\n",
           n, writes, len, batch, (c1 - c0) * 1e6 / writes, (c1 - c0) * 1e6 / writes / batch, (u1 - u0) * 1e6 / writes, WIFEXITED(st) && WEXITSTATUS(st) == 0 ? "true" : "false");
    return 0;
}

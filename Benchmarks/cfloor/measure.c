/*
 * measure LIMIT_S PROGRAM [ARGS...]: runs PROGRAM once and, after its own
 * output, prints "measure: wall_us=W maxrss_kib=R status=S".
 *
 * It exists because a child spawned straight from Python inherits Python's
 * resident-set high-water mark: Linux folds the mm that exec replaces into
 * ru_maxrss, and after fork or vfork that mm is (a copy of) the parent's.
 * Here the program is forked from this small process instead, so its peak
 * RSS is its own. A run past LIMIT_S seconds is killed (status 137).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static pid_t child;

static void on_alarm(int sig)
{
	(void)sig;
	kill(child, SIGKILL);
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: measure LIMIT_S PROGRAM [ARGS...]\n");
		return 125;
	}
	struct sigaction sa = { .sa_handler = on_alarm };
	sigaction(SIGALRM, &sa, NULL);

	struct timespec start, end;
	clock_gettime(CLOCK_MONOTONIC, &start);
	child = fork();
	if (child < 0) {
		perror("measure: fork");
		return 125;
	}
	if (child == 0) {
		execvp(argv[2], argv + 2);
		perror("measure: exec");
		_exit(127);
	}
	alarm(atoi(argv[1]));

	int status;
	struct rusage usage;
	while (wait4(child, &status, 0, &usage) < 0)
		if (errno != EINTR) {
			perror("measure: wait4");
			return 125;
		}
	clock_gettime(CLOCK_MONOTONIC, &end);
	alarm(0);

	long wall_us = (end.tv_sec - start.tv_sec) * 1000000 + (end.tv_nsec - start.tv_nsec) / 1000;
	int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
	fflush(stdout);
	printf("measure: wall_us=%ld maxrss_kib=%ld status=%d\n", wall_us, usage.ru_maxrss, code);
	return 0;
}

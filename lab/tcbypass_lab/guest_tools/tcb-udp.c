// SPDX-License-Identifier: GPL-2.0
/*
 * tcb-udp: sequence-numbered UDP for the lab's qemu guests (their busybox nc
 * speaks TCP only). Built static when the guest's initramfs is built.
 *
 *   tcb-udp send HOST PORT RATE     datagrams "SEQ\n" at RATE a second, until killed
 *   tcb-udp recv PORT               print "SEQ MICROSECONDS" (CLOCK_MONOTONIC) per datagram
 */
#include <arpa/inet.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec * 1000000LL + ts.tv_nsec / 1000;
}

static int do_send(const char *host, int port, double rate)
{
	struct sockaddr_in to = { .sin_family = AF_INET, .sin_port = htons(port) };
	long long period = (long long)(1000000.0 / rate), due = now_us();
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	char buf[32];

	if (fd < 0 || inet_pton(AF_INET, host, &to.sin_addr) != 1)
		return 2;
	for (unsigned long seq = 0;; seq++) {
		int n = snprintf(buf, sizeof(buf), "%lu\n", seq);
		long long wait;

		sendto(fd, buf, n, 0, (struct sockaddr *)&to, sizeof(to));
		due += period;
		wait = due - now_us();
		if (wait > 0)
			usleep(wait);
	}
}

static int do_recv(int port)
{
	struct sockaddr_in me = { .sin_family = AF_INET, .sin_port = htons(port) };
	int fd = socket(AF_INET, SOCK_DGRAM, 0);
	char buf[64];

	if (fd < 0 || bind(fd, (struct sockaddr *)&me, sizeof(me)) < 0)
		return 2;
	setvbuf(stdout, NULL, _IOLBF, 0);
	for (;;) {
		ssize_t n = recv(fd, buf, sizeof(buf) - 1, 0);

		if (n <= 0)
			continue;
		buf[n] = 0;
		printf("%lu %lld\n", strtoul(buf, NULL, 10), now_us());
	}
}

int main(int argc, char **argv)
{
	if (argc == 5 && !strcmp(argv[1], "send"))
		return do_send(argv[2], atoi(argv[3]), atof(argv[4]));
	if (argc == 3 && !strcmp(argv[1], "recv"))
		return do_recv(atoi(argv[2]));
	fprintf(stderr, "usage: tcb-udp send HOST PORT RATE | recv PORT\n");
	return 2;
}

/* The ceiling of any libvirt-backed NBD server on this machine: read a
 * guest disk with virDomainBlockPeek alone, with no NBD server and no NBD
 * client, from THREADS threads (each with its own libvirt connection), in
 * peeks of PEEK bytes.  Prints the seconds taken.
 *
 * Build: gcc -O2 -o peek_ceiling peek_ceiling.c -lvirt -lpthread
 * Usage: peek_ceiling URI DOMAIN DISK SIZE THREADS PEEK
 *
 * bench/libvirt.ts runs it beside nbdkit's plugin and ours: a server cannot
 * take less time than this, whatever it does.
 */
#include <libvirt/libvirt.h>
#include <libvirt/virterror.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static const char *uri, *domain_name, *disk;
static unsigned long long size, peek;
static int threads;
static unsigned long long next_offset;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_barrier_t connected; /* the clock starts once every thread has its connection */

static void *
worker (void *arg)
{
  virConnectPtr conn = virConnectOpen (uri) /* peeking needs a read-write connection */;
  virDomainPtr dom = conn ? virDomainLookupByName (conn, domain_name) : NULL;
  char *buf = malloc (peek);
  (void) arg;
  if (!dom || !buf) {
    fprintf (stderr, "peek_ceiling: %s\n", virGetLastErrorMessage ());
    exit (1);
  }
  pthread_barrier_wait (&connected);
  for (;;) {
    unsigned long long offset;
    pthread_mutex_lock (&lock);
    offset = next_offset;
    next_offset += peek;
    pthread_mutex_unlock (&lock);
    if (offset >= size)
      break;
    size_t n = size - offset < peek ? size - offset : peek;
    if (virDomainBlockPeek (dom, disk, offset, n, buf, 0) < 0) {
      fprintf (stderr, "peek_ceiling: %s\n", virGetLastErrorMessage ());
      exit (1);
    }
  }
  free (buf);
  virDomainFree (dom);
  virConnectClose (conn);
  return NULL;
}

int
main (int argc, char *argv[])
{
  if (argc != 7) {
    fprintf (stderr, "usage: peek_ceiling URI DOMAIN DISK SIZE THREADS PEEK\n");
    return 2;
  }
  uri = argv[1];
  domain_name = argv[2];
  disk = argv[3];
  size = strtoull (argv[4], NULL, 10);
  threads = atoi (argv[5]);
  peek = strtoull (argv[6], NULL, 10);
  if (threads < 1 || threads > 64 || peek == 0) {
    fprintf (stderr, "peek_ceiling: bad THREADS or PEEK\n");
    return 2;
  }

  pthread_t tid[64];
  struct timespec t0, t1;
  pthread_barrier_init (&connected, NULL, threads + 1);
  for (int i = 0; i < threads; i++)
    pthread_create (&tid[i], NULL, worker, NULL);
  pthread_barrier_wait (&connected);
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (int i = 0; i < threads; i++)
    pthread_join (tid[i], NULL);
  clock_gettime (CLOCK_MONOTONIC, &t1);
  printf ("%.3f\n", (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9);
  return 0;
}

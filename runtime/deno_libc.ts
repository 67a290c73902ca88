/**
 * The few libc calls the Deno adapter makes through `Deno.dlopen`: Deno has
 * no `fcntl` (pipe sizes), no positional file I/O (its files seek, then
 * read, so requests on one file had to take turns), and no `fallocate`,
 * `SEEK_DATA`/`SEEK_HOLE` or `posix_fadvise` (the file plugin's TRIM, zeroes
 * and extents).
 *
 * @module
 */

/** `open(2)` flags (Linux). */
export const O_RDONLY = 0;
/** @see O_RDONLY */
export const O_WRONLY = 1;
/** @see O_RDONLY */
export const O_RDWR = 2;
/** @see O_RDONLY */
export const O_NONBLOCK = 0o4000;
/** @see O_RDONLY */
export const O_CLOEXEC = 0o2000000;

const SYMBOLS = {
  open: { parameters: ["buffer", "i32", "i32"], result: "i32" },
  close: { parameters: ["i32"], result: "i32" },
  fcntl: { parameters: ["i32", "i32", "i32"], result: "i32" },
  // The paced FIFO writer: nonblocking writes on this thread, errno read right after.
  write: { parameters: ["i32", "buffer", "usize"], result: "isize" },
  __errno_location: { parameters: [], result: "pointer" },
  ioctl: { parameters: ["i32", "u64", "buffer"], result: "i32" },
  // On Deno's blocking threads: concurrent, and the event loop runs on.
  pread: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize", nonblocking: true },
  pwrite: { parameters: ["i32", "buffer", "usize", "i64"], result: "isize", nonblocking: true },
  // Reads from the page cache, on this thread (RWF_NOWAIT: see CachedReads).
  preadv2: {
    parameters: ["i32", "buffer", "i32", "i64", "i32"],
    result: "isize",
    optional: true,
  },
  fdatasync: { parameters: ["i32"], result: "i32", nonblocking: true },
  // The file plugin's hole punching and finding (deno_file.ts). errno belongs
  // to the thread that made the call, so a call that failed on a blocking
  // thread is made again here ("_now") to read it.
  fallocate64: { parameters: ["i32", "i32", "i64", "i64"], result: "i32", nonblocking: true },
  fallocate64_now: { name: "fallocate64", parameters: ["i32", "i32", "i64", "i64"], result: "i32" },
  lseek64: { parameters: ["i32", "i64", "i32"], result: "i64", nonblocking: true },
  lseek64_now: { name: "lseek64", parameters: ["i32", "i64", "i32"], result: "i64" },
  // SIGUSR1 back to its default action (runtime/deno.ts: endOnSigusr1).
  signal: { parameters: ["i32", "usize"], result: "usize" },
  // A TCP listener on `::` for IPv6 alone (deno_v6only.ts): Deno.listen has
  // no IPV6_V6ONLY.
  socket: { parameters: ["i32", "i32", "i32"], result: "i32" },
  setsockopt: { parameters: ["i32", "i32", "i32", "buffer", "u32"], result: "i32" },
  bind: { parameters: ["i32", "buffer", "u32"], result: "i32" },
  listen: { parameters: ["i32", "i32"], result: "i32" },
  getsockname: { parameters: ["i32", "buffer", "buffer"], result: "i32" },
  // Returns the error number itself: no second call needed.
  posix_fadvise64: { parameters: ["i32", "i64", "i64", "i32"], result: "i32", nonblocking: true },
} as const;

/**
 * A reader of this thread's errno (glibc's `__errno_location`), for calls
 * made on this thread: one made on Deno's blocking threads sets theirs.
 *
 * @param libc The calls.
 * @returns A function that reads errno now.
 */
export function errnoReader(libc: DenoLibc): () => number {
  const at = new Deno.UnsafePointerView(libc.__errno_location()!);
  return () => at.getInt32();
}

/** The calls, as `Deno.dlopen` types them. */
export type DenoLibc = Deno.DynamicLibrary<typeof SYMBOLS>["symbols"];

let libc: DenoLibc | null | undefined;

/**
 * libc, when FFI is already allowed: asking would prompt a user who ran
 * without `--allow-ffi`, for a mere speed-up. Null without it (or on a libc
 * other than glibc): callers keep Deno's own, slower ways.
 *
 * @returns The calls, or null.
 */
export function denoLibc(): DenoLibc | null {
  if (libc !== undefined) return libc;
  libc = null;
  try {
    if (Deno.permissions.querySync({ name: "ffi" }).state === "granted") {
      libc = Deno.dlopen("libc.so.6", SYMBOLS).symbols;
    }
  } catch {
    // no libc.so.6
  }
  return libc;
}

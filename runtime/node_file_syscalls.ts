/**
 * {@linkcode FileSyscalls} for the Node adapter and for the Bun adapter
 * (which uses Node's files with its own FFI).
 *
 * On Node they are koffi's asynchronous calls, on libuv's thread pool, so
 * that punching a hole in a large file does not stall the event loop (but
 * for the page-cache read, which is synchronous by design); koffi
 * (≥ 3.2) keeps the calling thread's errno for the callback. Without koffi
 * (an optional dependency) there are none. On Bun they are `bun:ffi` calls,
 * which run on the JavaScript thread, errno read right after; the calls are
 * short (extent-tree updates, not data transfers).
 *
 * @module
 */
import { type FileSyscalls, RWF_NOWAIT } from "./file_syscalls.ts";
import { type BunFfi, type BunPointer, importBunFfi } from "./libvirt/bun_ffi.ts";

let koffiLoaded: Promise<FileSyscalls | null> | undefined;
let bunLoaded: Promise<FileSyscalls | null> | undefined;

/**
 * The calls through koffi (Node), loaded once; null without koffi.
 *
 * @returns The calls, or null.
 */
export function koffiFileSyscalls(): Promise<FileSyscalls | null> {
  return koffiLoaded ??= koffiCalls().catch(() => null);
}

/**
 * The calls through `bun:ffi`, loaded once; null if libc cannot be opened.
 *
 * @returns The calls, or null.
 */
export function bunFileSyscalls(): Promise<FileSyscalls | null> {
  return bunLoaded ??= bunCalls().catch(() => null);
}

// deno-lint-ignore no-explicit-any
type KoffiFn = ((...args: any[]) => number | bigint) & { async(...args: any[]): void };

interface Koffi {
  load(path: string): { func(definition: string): KoffiFn };
  struct(name: string, members: Record<string, string>): unknown;
  errno(): number;
}

async function koffiCalls(): Promise<FileSyscalls> {
  const mod = await import("koffi") as unknown as { default?: Koffi } & Koffi;
  const koffi = mod.default ?? mod;
  const lib = koffi.load("libc.so.6");
  const fallocate = lib.func("int fallocate64(int, int, int64_t, int64_t)");
  const lseek = lib.func("int64_t lseek64(int, int64_t, int)");
  const fadvise = lib.func("int posix_fadvise64(int, int64_t, int64_t, int)");
  koffi.struct("nbdkit_ts_iovec", { base: "void *", len: "size_t" });
  const preadv2 = lib.func("int64_t preadv2(int, const nbdkit_ts_iovec *, int, int64_t, int)");
  /** Call `fn` on the thread pool; with `setsErrno`, a negative result becomes -errno. */
  const call = (fn: KoffiFn, setsErrno: boolean, ...args: number[]) =>
    new Promise<number>((resolve, reject) => {
      fn.async(...args, (err: unknown, result: number | bigint) => {
        if (err) reject(err);
        else resolve(setsErrno && result < 0 ? -koffi.errno() : Number(result));
      });
    });
  return {
    // Synchronous, on this thread: a page-cache copy (see CachedReads).
    preadNowait(fd, buf, offset) {
      const r = Number(preadv2(fd, { base: buf, len: buf.length }, 1, offset, RWF_NOWAIT));
      return r >= 0 ? r : -koffi.errno();
    },
    fallocate: (fd, mode, offset, length) => call(fallocate, true, fd, mode, offset, length),
    lseek: (fd, offset, whence) => call(lseek, true, fd, offset, whence),
    fadvise: (fd, offset, length, advice) => call(fadvise, false, fd, offset, length, advice),
  };
}

interface BunLibc {
  preadv2(fd: number, iov: BunPointer, count: number, offset: number, flags: number): number;
  fallocate64(fd: number, mode: number, offset: number, length: number): number;
  lseek64(fd: number, offset: number, whence: number): bigint;
  posix_fadvise64(fd: number, offset: number, length: number, advice: number): number;
  __errno_location(): BunPointer;
}

async function bunCalls(): Promise<FileSyscalls> {
  const ffi = await importBunFfi() as BunFfi & { read: { i32(at: BunPointer): number } };
  const { symbols: libc } = ffi.dlopen<BunLibc>("libc.so.6", {
    preadv2: { args: ["i32", "ptr", "i32", "i64", "i32"], returns: "i64_fast" },
    fallocate64: { args: ["i32", "i32", "i64", "i64"], returns: "i32" },
    lseek64: { args: ["i32", "i64", "i32"], returns: "i64" },
    posix_fadvise64: { args: ["i32", "i64", "i64", "i32"], returns: "i32" },
    __errno_location: { args: [], returns: "ptr" },
  });
  const result = (r: number | bigint) =>
    Promise.resolve(r < 0 ? -ffi.read.i32(libc.__errno_location()) : Number(r));
  // One iovec serves every call: each runs to completion on this thread.
  const iov = new BigUint64Array(2);
  const iovPtr = ffi.ptr(iov);
  return {
    preadNowait(fd, buf, offset) {
      iov[0] = BigInt(ffi.ptr(buf));
      iov[1] = BigInt(buf.length);
      const r = Number(libc.preadv2(fd, iovPtr, 1, offset, RWF_NOWAIT));
      return r >= 0 ? r : -ffi.read.i32(libc.__errno_location());
    },
    fallocate: (fd, mode, offset, length) => result(libc.fallocate64(fd, mode, offset, length)),
    lseek: (fd, offset, whence) => result(libc.lseek64(fd, offset, whence)),
    fadvise: (fd, offset, length, advice) =>
      Promise.resolve(libc.posix_fadvise64(fd, offset, length, advice)),
  };
}

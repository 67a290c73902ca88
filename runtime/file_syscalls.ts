/**
 * The file calls that no runtime exposes, shared by the adapters:
 * `fallocate(2)` (punching holes, zeroing ranges), `lseek(2)` with
 * `SEEK_DATA`/`SEEK_HOLE` (finding holes) and `posix_fadvise(2)`. Each
 * adapter reaches libc through its own FFI (`Deno.dlopen`, `bun:ffi`, koffi)
 * and hands the raw calls to {@linkcode fileExtras}, which turns them into
 * the optional methods of {@linkcode RandomAccessFile}; errno becomes an
 * error whose `code` is its name, as Node's `fs` reports errors.
 *
 * @module
 */
import type { FileKind, RandomAccessFile } from "./types.ts";
import { ERRNO } from "./errno.ts";

/**
 * The raw calls, as an adapter's FFI makes them. Each resolves to the call's
 * result (0, or the offset for `lseek`), or to minus errno when it failed;
 * `fadvise` is `posix_fadvise`, which returns the error number itself.
 */
export interface FileSyscalls {
  /** `fallocate(fd, mode, offset, length)`. */
  fallocate(fd: number, mode: number, offset: number, length: number): Promise<number>;
  /** `lseek(fd, offset, whence)`. */
  lseek(fd: number, offset: number, whence: number): Promise<number>;
  /** `posix_fadvise(fd, offset, length, advice)`. */
  fadvise(fd: number, offset: number, length: number, advice: number): Promise<number>;
  /**
   * `preadv2(fd, [buf], 1, offset, RWF_NOWAIT)`, synchronous, on the
   * JavaScript thread: the bytes read, or minus errno (EAGAIN when they are
   * not in the page cache). Absent where the FFI cannot make it.
   */
  preadNowait?(fd: number, buf: Uint8Array, offset: number): number;
}

/** `preadv2(2)`'s flag: fail with EAGAIN rather than wait for the disk. */
export const RWF_NOWAIT = 0x08;

/**
 * Reads up to this size are tried from the page cache first, on the
 * JavaScript thread. Larger ones go to the thread pool at once: copying
 * them would hold up the event loop (and the other connections) for longer.
 * A 1 MiB copy from the page cache takes about as long as sending the same
 * reply into the socket, which that thread does anyway; below it the hand-off
 * to the pool costs more than it saves. nbdcopy of a cached 1 GiB file (256
 * KiB reads on 4 connections), 2026-12-02, against 128 KiB here before:
 * server CPU 0.64–0.97 → 0.50–0.64 s on Deno, 0.55–0.70 → 0.48–0.53 s on
 * Bun, 0.97–1.11 → 0.71–0.84 s on Node.
 */
export const CACHED_READ_MAX = 1024 * 1024;

const EINVAL = 22;
const ENOSYS = 38;
const EOPNOTSUPP = 95;

/**
 * Reads served from the page cache without leaving the JavaScript thread.
 * A pread handed to a thread pool costs tens of microseconds in wake-ups
 * and hand-offs; a 4 KiB page-cache copy costs one or two. So a read is
 * first tried with `RWF_NOWAIT`, which returns what is cached at once and
 * never waits for the disk, and only what it did not return goes to the
 * pool. On a kernel or file system without `RWF_NOWAIT` it stops trying.
 *
 * @example
 * ```ts
 * import { CachedReads } from "./file_syscalls.ts";
 * const reads = new CachedReads(() => -95); // EOPNOTSUPP: not on this file system
 * console.assert(reads.read(3, new Uint8Array(4096), 0) === 0);
 * ```
 */
export class CachedReads {
  #call: (fd: number, buf: Uint8Array, offset: number) => number;
  #off = false;

  /**
   * Wrap a synchronous `preadv2(…, RWF_NOWAIT)`.
   *
   * @param call {@linkcode FileSyscalls.preadNowait}.
   */
  constructor(call: (fd: number, buf: Uint8Array, offset: number) => number) {
    this.#call = call;
  }

  /**
   * Read from the page cache into the start of `buf`.
   *
   * @param fd The file.
   * @param buf Where the bytes go.
   * @param offset Where to read.
   * @returns How many bytes were read: 0 when none were cached, at the end
   *   of the file, or on any error (the caller's own read reports it).
   */
  read(fd: number, buf: Uint8Array, offset: number): number {
    if (this.#off || buf.length > CACHED_READ_MAX || buf.length === 0) return 0;
    const n = this.#call(fd, buf, offset);
    if (n >= 0) return n;
    // EOPNOTSUPP (no RWF_NOWAIT here), ENOSYS, EINVAL: it never will work.
    if (n === -EOPNOTSUPP || n === -ENOSYS || n === -EINVAL) this.#off = true;
    return 0;
  }
}

/** `fallocate(2)` modes (Linux). */
export const FALLOC_FL_KEEP_SIZE = 0x01;
/** @see FALLOC_FL_KEEP_SIZE */
export const FALLOC_FL_PUNCH_HOLE = 0x02;
/** @see FALLOC_FL_KEEP_SIZE */
export const FALLOC_FL_ZERO_RANGE = 0x10;

/** `lseek(2)` whence values (Linux). */
export const SEEK_END = 2;
/** @see SEEK_END */
export const SEEK_DATA = 3;
/** @see SEEK_END */
export const SEEK_HOLE = 4;

const MODES = {
  "punch-hole": FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
  "zero-range": FALLOC_FL_ZERO_RANGE,
  "allocate": 0,
} as const;

// posix_fadvise's POSIX_FADV_* (Linux).
const ADVICE = { normal: 0, random: 1, sequential: 2, willneed: 3, dontneed: 4 } as const;

const ENXIO = 6;

/**
 * The error of a failed call: its message is `CALL: strerror`, its `code`
 * the errno's name.
 *
 * @param call What failed, for the message.
 * @param errno The error number.
 * @returns The error, to throw.
 */
export function syscallError(call: string, errno: number): Error & { code: string } {
  const [code, text] = ERRNO[errno] ?? [`E${errno}`, `errno ${errno}`];
  return Object.assign(new Error(`${call}: ${text}`), { code });
}

/**
 * A read that met the end of the file before its buffer was full: the file
 * shrank under the server. EIO, with nbdkit's wording, rather than zeroes
 * that a copy would take for the disk's data.
 *
 * @returns The error `pread` rejects with.
 *
 * @example
 * ```ts
 * import { endOfFileError } from "./file_syscalls.ts";
 * console.assert(endOfFileError().code === "EIO");
 * ```
 */
export function endOfFileError(): Error & { code: string } {
  return Object.assign(new Error("unexpected end of file"), { code: "EIO" });
}

/** The FFI-only methods of {@linkcode RandomAccessFile}. */
export type FileExtras = Required<Pick<RandomAccessFile, "fallocate" | "seek" | "advise">>;

/**
 * The FFI-only methods of a file, made with `calls` on the descriptor that
 * `fd` returns (read at each call, so that a closed file's methods fail with
 * EBADF rather than reach a descriptor reused by another file).
 *
 * @param calls The adapter's raw calls.
 * @param fd The file's descriptor, or -1 once it is closed.
 * @returns The methods.
 */
export function fileExtras(calls: FileSyscalls, fd: () => number): FileExtras {
  return {
    async fallocate(mode, offset, length) {
      const r = await calls.fallocate(fd(), MODES[mode], offset, length);
      if (r < 0) throw syscallError("fallocate", -r);
    },
    async seek(offset, whence) {
      const r = await calls.lseek(fd(), offset, whence === "data" ? SEEK_DATA : SEEK_HOLE);
      if (r === -ENXIO) return null;
      if (r < 0) throw syscallError(`lseek: ${whence === "data" ? "SEEK_DATA" : "SEEK_HOLE"}`, -r);
      return r;
    },
    async advise(offset, length, advice) {
      const r = await calls.fadvise(fd(), offset, length, ADVICE[advice]);
      if (r !== 0) throw syscallError("posix_fadvise", Math.abs(r));
    },
  };
}

/**
 * The size of a block device without FFI, from sysfs: fstat says 0 for one,
 * and only `lseek(SEEK_END)` or an ioctl would say more.
 *
 * @param rdev The device number (`st_rdev`).
 * @returns The path of the file holding its size in 512-byte sectors.
 */
export function sysfsSizePath(rdev: number): string {
  // glibc's major()/minor() split of a 64-bit dev_t, in arithmetic that stays
  // exact beyond 32 bits.
  const high = Math.floor(rdev / 2 ** 32);
  const low = rdev >>> 0;
  const major = ((low >>> 8) & 0xfff) | ((high & 0xfffff000) >>> 0);
  const minor = ((low & 0xff) | ((low >>> 12) & 0xfff00) | ((high & 0xfff) << 20)) >>> 0;
  return `/sys/dev/block/${major}:${minor}/size`;
}

/**
 * Refuse a FIFO or socket where a file for random access was asked for (the
 * runtimes' openFile refuse them rather than wait for a peer).
 *
 * @param path What was opened.
 * @param kind What it turned out to be (null: not known).
 * @throws An error with code EINVAL for a FIFO or a socket.
 */
export function refuseUnseekable(path: string, kind: FileKind | null): void {
  if (kind !== "fifo" && kind !== "socket") return;
  const what = kind === "fifo" ? "a FIFO" : "a socket";
  throw Object.assign(new Error(`${path}: is ${what}, not a file for random access`), {
    code: "EINVAL",
  });
}

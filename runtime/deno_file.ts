/**
 * Files for random access on Deno.
 *
 * Deno's `FsFile` has no positional reads or writes: a request seeks, then
 * reads, and requests on one file must take turns. When FFI is allowed the
 * file is opened a second time through libc and served with `pread` and
 * `pwrite` on Deno's blocking threads, concurrently (nbdcopy of a 1 GiB
 * file: see bench/RESULTS.md). Errors are reported by Deno's own calls: a
 * failed `pread`/`pwrite` is done again the slow way, which throws Deno's
 * message for it (libc's errno is not visible from here).
 *
 * Small reads are first tried from the page cache on this thread
 * (`preadv2` with `RWF_NOWAIT`, see {@linkcode CachedReads}): a 4 KiB read
 * that is cached then costs no trip to the blocking threads.
 *
 * The same libc descriptor punches holes, zeroes ranges and finds holes
 * (`fallocate`, `lseek` with `SEEK_DATA`/`SEEK_HOLE`, `posix_fadvise`), also
 * on the blocking threads; a call that fails there is made again on this
 * thread, where its errno can be read. Without FFI the file has none of them.
 *
 * @module
 */
import type { FileKind, RandomAccessFile } from "./types.ts";
import {
  type DenoLibc,
  denoLibc,
  errnoReader,
  O_CLOEXEC,
  O_NONBLOCK,
  O_RDONLY,
  O_RDWR,
} from "./deno_libc.ts";
import { cString } from "./c_string.ts";
import { ERRNO } from "./errno.ts";
import {
  CachedReads,
  endOfFileError,
  type FileExtras,
  fileExtras,
  type FileSyscalls,
  refuseUnseekable,
  RWF_NOWAIT,
} from "./file_syscalls.ts";

/**
 * Deno gives an error it has no class for (EFBIG, EDQUOT…) no `code`, only
 * "File too large (os error 27)": the code is put back from the number, so
 * that the client gets the errno nbdkit would send (ENOSPC there), not EIO.
 */
function withErrnoCode(err: unknown): unknown {
  if (!(err instanceof Error) || "code" in err) return err;
  const n = /\(os error (\d+)\)$/.exec(err.message)?.[1];
  const code = n === undefined ? undefined : ERRNO[Number(n)]?.[0];
  return code === undefined ? err : Object.assign(err, { code });
}

/**
 * Open `path` for random access.
 *
 * @param path The file or block device.
 * @param write Whether writes are allowed.
 * @returns The file.
 */
export async function openDenoFile(path: string, write: boolean): Promise<RandomAccessFile> {
  const libc = denoLibc();
  // libc's descriptor first, nonblocking: this open runs on the event loop's
  // thread, and a FIFO put at the path would hold it. Deno's file is then the
  // same file through /proc/self/fd whatever the path names by now. Only
  // regular files and block devices are served this way.
  const fd = libc
    ? libc.open(cString(path), (write ? O_RDWR : O_RDONLY) | O_NONBLOCK | O_CLOEXEC, 0)
    : -1;
  if (fd >= 0) {
    const self = `/proc/self/fd/${fd}`;
    const info = await Deno.stat(self).catch(() => null);
    const kind = info ? kindOf(info) : null;
    const file = kind === "file" || kind === "block"
      ? await Deno.open(self, { read: true, write }).catch(() => null)
      : null;
    if (file) return new DenoFile(file, libc, fd, kind!);
    libc!.close(fd);
    // Opening a FIFO again, by either name, would wait for a peer.
    refuseUnseekable(path, kind);
  }
  // Without FFI a FIFO can only be told by name first (the open would wait).
  const named = fd < 0 ? await Deno.stat(path).catch(() => null) : null;
  refuseUnseekable(path, named ? kindOf(named) : null);
  // Deno's errors ("No such file or directory (os error 2)") are the ones reported.
  const file = await Deno.open(path, { read: true, write });
  try {
    return new DenoFile(file, null, -1, kindOf(await file.stat()));
  } catch (err) {
    file.close();
    throw err;
  }
}

/**
 * What kind of file Deno's `stat` describes.
 *
 * @param info What `Deno.stat` or `FsFile.stat` returned.
 * @returns Its {@linkcode FileKind}.
 */
export function kindOf(info: Deno.FileInfo): FileKind {
  if (info.isFile) return "file";
  if (info.isDirectory) return "directory";
  if (info.isFifo) return "fifo";
  if (info.isSocket) return "socket";
  if (info.isCharDevice) return "char";
  if (info.isBlockDevice) return "block";
  return "other";
}

/** {@linkcode FileSyscalls} through `Deno.dlopen`. */
function denoFileSyscalls(libc: DenoLibc): FileSyscalls {
  const errno = errnoReader(libc);
  const n = BigInt;
  const preadv2 = libc.preadv2;
  // One iovec serves every call: each runs to completion on this thread.
  const iov = new BigUint64Array(2);
  return {
    preadNowait: preadv2
      ? (fd, buf, offset) => {
        iov[0] = BigInt(
          Deno.UnsafePointer.value(Deno.UnsafePointer.of(buf as Uint8Array<ArrayBuffer>)),
        );
        iov[1] = BigInt(buf.length);
        const r = Number(preadv2(fd, iov, 1, n(offset), RWF_NOWAIT));
        return r >= 0 ? r : -errno();
      }
      : undefined,
    async fallocate(fd, mode, offset, length) {
      if (await libc.fallocate64(fd, mode, n(offset), n(length)) === 0) return 0;
      return libc.fallocate64_now(fd, mode, n(offset), n(length)) === 0 ? 0 : -errno();
    },
    async lseek(fd, offset, whence) {
      const r = Number(await libc.lseek64(fd, n(offset), whence));
      if (r >= 0) return r;
      const again = Number(libc.lseek64_now(fd, n(offset), whence));
      return again >= 0 ? again : -errno();
    },
    fadvise: (fd, offset, length, advice) => libc.posix_fadvise64(fd, n(offset), n(length), advice),
  };
}

class DenoFile implements RandomAccessFile {
  #file: Deno.FsFile;
  #libc: DenoLibc | null;
  #fd: number;
  // Seek and read must not interleave between requests on the slow path.
  #lock: Promise<unknown> = Promise.resolve();
  #cached: CachedReads | null = null;
  readonly kind: FileKind;
  fallocate?: FileExtras["fallocate"];
  seek?: FileExtras["seek"];
  advise?: FileExtras["advise"];

  constructor(file: Deno.FsFile, libc: DenoLibc | null, fd: number, kind: FileKind) {
    this.#file = file;
    this.kind = kind;
    this.#libc = libc;
    this.#fd = fd;
    if (libc) {
      const calls = denoFileSyscalls(libc);
      Object.assign(this, fileExtras(calls, () => this.#fd));
      if (calls.preadNowait) this.#cached = new CachedReads(calls.preadNowait);
    }
  }

  #locked<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.#lock.then(fn, fn).catch((err) => {
      throw withErrnoCode(err);
    });
    this.#lock = run.catch(() => {});
    return run;
  }

  /**
   * `pread` or `pwrite` through libc until `buf` is done, the file ends or
   * a call fails. Returns how many bytes were done: the caller finishes the
   * rest the slow way, which also names an error.
   */
  async #positional(
    call: "pread" | "pwrite",
    buf: Uint8Array,
    offset: number,
    done = 0,
  ): Promise<number> {
    while (this.#libc && done < buf.length) {
      const n = Number(
        await this.#libc[call](
          this.#fd,
          buf.subarray(done) as Uint8Array<ArrayBuffer>,
          BigInt(buf.length - done),
          BigInt(offset + done),
        ),
      );
      if (n <= 0) break;
      done += n;
    }
    return done;
  }

  pread(buf: Uint8Array, offset: number): Promise<void> | undefined {
    const cached = this.#cached ? this.#cached.read(this.#fd, buf, offset) : 0;
    if (cached === buf.length) return undefined;
    return this.#preadRest(buf, offset, cached);
  }

  async #preadRest(buf: Uint8Array, offset: number, cached: number): Promise<void> {
    const done = await this.#positional("pread", buf, offset, cached);
    if (done < buf.length) await this.#slowPread(buf.subarray(done), offset + done);
  }

  #slowPread(buf: Uint8Array, offset: number): Promise<void> {
    return this.#locked(async () => {
      await this.#file.seek(offset, Deno.SeekMode.Start);
      let done = 0;
      while (done < buf.length) {
        const n = await this.#file.read(buf.subarray(done));
        if (n === null) throw endOfFileError();
        done += n;
      }
    });
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    let done = await this.#positional("pwrite", buf, offset);
    if (done === buf.length) return;
    await this.#locked(async () => {
      await this.#file.seek(offset + done, Deno.SeekMode.Start);
      while (done < buf.length) done += await this.#file.write(buf.subarray(done));
    });
  }

  async size(): Promise<number> {
    const info = await this.#file.stat();
    if (!info.isBlockDevice) return info.size;
    // stat says 0 for a block device: its end is where seeking to the end lands.
    return await this.#locked(() => this.#file.seek(0, Deno.SeekMode.End));
  }

  async sync(): Promise<void> {
    if (this.#libc && await this.#libc.fdatasync(this.#fd) === 0) return;
    await this.#locked(() => this.#file.syncData());
  }

  close(): Promise<void> {
    return this.#locked(() => {
      if (this.#libc) this.#libc.close(this.#fd);
      this.#libc = null;
      this.#fd = -1;
      this.#file.close();
      return Promise.resolve();
    });
  }
}

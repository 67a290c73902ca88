/**
 * Enlarging the kernel buffer of a pipe or FIFO, shared by the adapters.
 *
 * A pipe holds 64 KiB by default: a writer streaming a disk wakes its reader
 * (and is woken) every 64 KiB. At 1 MiB both ends switch far less often;
 * measured with the streaming plugin feeding `sha256sum`, 1 GiB took 3.56 s
 * instead of 3.88 s (medians of 6). Linux's `F_SETPIPE_SZ` does it; no runtime
 * exposes `fcntl`, so each adapter reaches libc through its own FFI, and the
 * logic lives here.
 *
 * @module
 */

/** The size asked for: Linux's default `/proc/sys/fs/pipe-max-size`. */
export const PIPE_SIZE = 1 << 20;

/** `fcntl` commands (Linux). */
export const F_SETPIPE_SZ = 1031;

/** `open(2)` flags (Linux). */
export const O_RDONLY = 0;
/** @see O_RDONLY */
export const O_WRONLY = 1;
/** @see O_RDONLY */
export const O_NONBLOCK = 0o4000;
/** @see O_RDONLY */
export const O_CLOEXEC = 0o2000000;

/** The libc calls needed, as each adapter's FFI provides them. */
export interface PipeLibc {
  /** `fcntl(fd, cmd, arg)`. */
  fcntl(fd: number, cmd: number, arg: number): number;
  /** `open(path, flags)`, path NUL-terminated (for {@linkcode enlargeFifo}). */
  open?(path: Uint8Array, flags: number): number;
  /** `close(fd)` (for {@linkcode enlargeFifo}). */
  close?(fd: number): number;
}

/**
 * Enlarge the pipe behind `fd`; a descriptor that is no pipe, or a kernel
 * that refuses, leaves it as it was (this only ever saves time).
 *
 * @param libc The FFI calls, or null when the runtime has none.
 * @param fd An open descriptor.
 */
export function enlargePipeFd(libc: PipeLibc | null, fd: number): void {
  try {
    libc?.fcntl(fd, F_SETPIPE_SZ, PIPE_SIZE);
  } catch {
    // best effort
  }
}

/**
 * Enlarge the pipe of the FIFO at `path`, which the caller has open already
 * (so a second, nonblocking open of the same end succeeds at once): the size
 * belongs to the pipe, whichever descriptor sets it. For runtimes whose file
 * handles do not expose their descriptor.
 *
 * @param libc The FFI calls, or null when the runtime has none.
 * @param path The FIFO.
 * @param write Which end the caller holds.
 */
export function enlargeFifo(libc: PipeLibc | null, path: string, write: boolean): void {
  if (!libc?.open || !libc.close) return;
  try {
    const flags = (write ? O_WRONLY : O_RDONLY) | O_NONBLOCK | O_CLOEXEC;
    const fd = libc.open(new TextEncoder().encode(`${path}\0`), flags);
    if (fd < 0) return;
    enlargePipeFd(libc, fd);
    libc.close(fd);
  } catch {
    // best effort
  }
}

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

/** @see F_SETPIPE_SZ */
export const F_GETPIPE_SZ = 1032;

/** The libc call needed, as each adapter's FFI provides it. */
export interface PipeLibc {
  /** `fcntl(fd, cmd, arg)`. */
  fcntl(fd: number, cmd: number, arg: number): number;
  /** The bytes waiting in the pipe behind `fd` (`ioctl FIONREAD`), -1 on failure; for pacing writes. */
  queued?(fd: number): number;
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
 * The size of the pipe behind `fd`.
 *
 * @param libc The FFI calls.
 * @param fd An open pipe descriptor.
 * @returns Its size in bytes; Linux's default (64 KiB) when the kernel does not say.
 */
export function pipeCapacity(libc: PipeLibc, fd: number): number {
  try {
    const size = libc.fcntl(fd, F_GETPIPE_SZ, 0);
    if (size > 0) return size;
  } catch {
    // fall through
  }
  return 64 * 1024;
}

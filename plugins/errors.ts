/**
 * The error a plugin throws to send a specific errno to the client.
 *
 * @module
 */

/** The errno names a plugin may send to the client. */
export type Errno =
  | "EPERM"
  | "EIO"
  | "ENOMEM"
  | "EINVAL"
  | "ENOSPC"
  | "EOVERFLOW"
  | "ENOTSUP"
  | "ESHUTDOWN";

/** The wire value of each errno (NBD's numbering, which is Linux's). */
export const ERRNO_VALUES: Readonly<Record<Errno, number>> = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
};

/**
 * An error with an errno. The server logs the message on stderr and sends
 * the client only the errno; any other thrown value becomes EIO.
 *
 * @example Refusing a request
 * ```ts
 * import { NbdError } from "./errors.ts";
 * const err = new NbdError("ENOSPC", "The disk is full");
 * console.assert(err.errno === "ENOSPC");
 * ```
 */
export class NbdError extends Error {
  /** The errno sent to the client. */
  readonly errno: Errno;

  /**
   * Create an error.
   *
   * @param errno The errno the client receives.
   * @param message The message logged on the server's stderr.
   */
  constructor(errno: Errno, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NbdError";
    this.errno = errno;
  }
}

/**
 * The errno of any thrown value: an {@linkcode NbdError}'s own, EIO otherwise.
 *
 * @param err Whatever was thrown.
 * @returns The errno name.
 */
export function errnoOf(err: unknown): Errno {
  return err instanceof NbdError ? err.errno : "EIO";
}

/**
 * The message of any thrown value, on one line.
 *
 * @param err Whatever was thrown.
 * @returns A message without line breaks.
 */
export function messageOf(err: unknown): string {
  const text = err instanceof Error ? err.message : String(err);
  return text.replace(/\s*\n\s*/g, " ");
}

/**
 * The error a plugin throws to send a specific errno to the client.
 *
 * @module
 */

/**
 * The errno names a plugin may send to the client (those the NBD protocol
 * defines).
 *
 * @example Choosing the errno from what went wrong
 * ```ts
 * import type { Errno } from "./errors.ts";
 * const errnoFor = (cause: string): Errno => cause === "full" ? "ENOSPC" : "EIO";
 * console.assert(errnoFor("full") === "ENOSPC");
 * ```
 */
export type Errno =
  | "EPERM"
  | "EIO"
  | "ENOMEM"
  | "EINVAL"
  | "ENOSPC"
  | "EOVERFLOW"
  | "ENOTSUP"
  | "ESHUTDOWN";

/**
 * The wire value of each errno (NBD's numbering, which is Linux's).
 *
 * @example
 * ```ts
 * import { ERRNO_VALUES } from "./errors.ts";
 * console.assert(ERRNO_VALUES.EPERM === 1 && ERRNO_VALUES.ENOSPC === 28);
 * ```
 */
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
 * An error with an errno. The server logs the message on stderr (as
 * `nbdkit-ts: PLUGIN[N]: error: MESSAGE`) and sends the client only the
 * errno; any other thrown value becomes EIO.
 *
 * @example Refusing a request
 * ```ts
 * import { NbdError } from "./errors.ts";
 * const err = new NbdError("ENOSPC", "The disk is full");
 * console.assert(err.errno === "ENOSPC");
 * ```
 *
 * @example In a plugin: refuse writes past a quota, keeping the cause
 * ```ts
 * import { NbdError } from "./errors.ts";
 * const quota = 1024 * 1024;
 * function pwrite(buf: Uint8Array, offset: number): void {
 *   if (offset + buf.length > quota) {
 *     throw new NbdError("ENOSPC", `over the quota of ${quota} bytes: offset ${offset}`);
 *   }
 * }
 * try {
 *   pwrite(new Uint8Array(512), quota);
 * } catch (err) {
 *   console.assert(err instanceof NbdError && err.errno === "ENOSPC");
 * }
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
   * @param options `cause`: the error behind this one.
   */
  constructor(errno: Errno, message: string, options?: ErrorOptions) {
    super(message, options);
    this.name = "NbdError";
    this.errno = errno;
  }
}

/**
 * The errno of any thrown value: an {@linkcode NbdError}'s own (also one from
 * another copy of this module, recognised by its name), or the `code` of a
 * system error a plugin let through (`ENOSPC` from a write, as a C plugin's
 * errno reaches nbdkit), with EROFS as EPERM and EDQUOT and EFBIG as ENOSPC,
 * as the spec asks; EIO for anything else, and for an errno that is not one
 * of ours (a plugin in plain JavaScript is not held to the {@linkcode Errno}
 * type). Never throws, even for a Proxy whose traps throw: a plugin's error
 * fails its request only.
 *
 * @param err Whatever was thrown.
 * @returns The errno name.
 *
 * @example
 * ```ts
 * import { errnoOf, NbdError } from "./errors.ts";
 * console.assert(errnoOf(new NbdError("EPERM", "read-only")) === "EPERM");
 * console.assert(errnoOf(new TypeError("oops")) === "EIO");
 * console.assert(errnoOf(Object.create(null)) === "EIO");
 * console.assert(errnoOf(Object.assign(new Error("full"), { code: "EDQUOT" })) === "ENOSPC");
 * ```
 */
export function errnoOf(err: unknown): Errno {
  try {
    if (typeof err !== "object" || err === null) return "EIO";
    const ours = err instanceof NbdError || (err as Error).name === "NbdError";
    const name = ours ? (err as { errno?: unknown }).errno : (err as { code?: unknown }).code;
    if (typeof name !== "string") return "EIO";
    if (Object.hasOwn(ERRNO_VALUES, name)) return name as Errno;
    return Object.hasOwn(ERRNO_ALIASES, name) ? ERRNO_ALIASES[name] : "EIO";
  } catch {
    return "EIO";
  }
}

/** System errors the spec (and nbdkit) reports as one of NBD's. */
const ERRNO_ALIASES: Readonly<Record<string, Errno>> = {
  EROFS: "EPERM",
  EDQUOT: "ENOSPC",
  EFBIG: "ENOSPC",
  EOPNOTSUPP: "ENOTSUP",
};

/**
 * The message of any thrown value, on one line. Never throws, even for an
 * object without a prototype or a Proxy whose traps throw (`String()` of
 * those throws, and an exception in a `catch` block would end the process).
 *
 * @param err Whatever was thrown.
 * @returns A message without line breaks.
 *
 * @example
 * ```ts
 * import { messageOf } from "./errors.ts";
 * console.assert(messageOf(new Error("first\n  second")) === "first second");
 * console.assert(messageOf("a string") === "a string");
 * console.assert(messageOf(Object.create(null)) === "the plugin threw a value that cannot be printed");
 * ```
 */
export function messageOf(err: unknown): string {
  try {
    const text = err instanceof Error ? String(err.message) : String(err);
    return text.replace(/\s*\n\s*/g, " ");
  } catch {
    return "the plugin threw a value that cannot be printed";
  }
}

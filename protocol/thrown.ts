/**
 * Whatever a plugin throws, made safe to log and to send: a plugin may throw
 * anything (a string, `undefined`, an object without a prototype, a Proxy
 * whose traps throw), and none of it may take the server down or reach the
 * client as anything but an errno.
 *
 * @module
 */
import { NBD_EIO } from "./constants.ts";
import { ERRNO_VALUES, errnoOf, messageOf } from "../plugins/errors.ts";

/**
 * The message of a thrown value, on one line; never throws.
 *
 * `messageOf` calls `String(err)`, which throws for an object without a
 * prototype (`Object.create(null)`) or a Proxy whose traps throw; an
 * exception from a `catch` block would become an unhandled rejection,
 * which ends the process on Deno and Node and loses the reply on Bun.
 *
 * @param err Whatever was thrown.
 * @returns A one-line message.
 *
 * @example
 * ```ts
 * import { safeMessage } from "./thrown.ts";
 * console.assert(safeMessage(Object.create(null)) === "the plugin threw a value that cannot be printed");
 * ```
 */
export function safeMessage(err: unknown): string {
  try {
    return messageOf(err);
  } catch {
    return "the plugin threw a value that cannot be printed";
  }
}

/**
 * The wire errno of a thrown value: an `NbdError`'s own, EIO for anything
 * else, and EIO too for an `NbdError` whose errno is not one of ours (a
 * plugin written in JavaScript is not held to the `Errno` type, and an
 * unknown name would otherwise become 0, which tells the client the request
 * succeeded). Never throws, never returns 0.
 *
 * @param err Whatever was thrown.
 * @returns An NBD errno, never 0.
 *
 * @example
 * ```ts
 * import { safeErrno } from "./thrown.ts";
 * console.assert(safeErrno("a string") === 5);
 * ```
 */
export function safeErrno(err: unknown): number {
  try {
    const name = errnoOf(err);
    const value = Object.hasOwn(ERRNO_VALUES, name) ? ERRNO_VALUES[name] : NBD_EIO;
    return typeof value === "number" && value > 0 ? value : NBD_EIO;
  } catch {
    return NBD_EIO;
  }
}

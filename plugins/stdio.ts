/**
 * Whether plugins may use standard input and output: nbdkit's
 * `nbdkit_stdio_safe()`. With `-s` the NBD connection itself runs over
 * them, so a plugin that would read a password, or stream to `-`, must not.
 *
 * @module
 */

let safe = true;

/**
 * Whether standard input and output are free for the plugin to use; false
 * when the server was started with `-s` (they carry the NBD connection).
 *
 * @returns True unless stdin/stdout are the transport.
 *
 * @example A plugin that accepts `-` for stdout only when it may
 * ```ts
 * import { stdioSafe } from "./stdio.ts";
 * function target(file: string): string {
 *   if (file === "-" && !stdioSafe()) throw new Error("file=- cannot be used with -s");
 *   return file;
 * }
 * console.assert(target("-") === "-");
 * ```
 */
export function stdioSafe(): boolean {
  return safe;
}

/**
 * Record whether stdin/stdout are free; the command line calls it before
 * any plugin callback when `-s` is given.
 *
 * @param value False when stdin/stdout carry the NBD connection.
 * @internal
 */
export function setStdioSafe(value: boolean): void {
  safe = value;
}

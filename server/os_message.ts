/**
 * One wording for operating system errors, whichever runtime raised them.
 *
 * @module
 */
import { messageOf } from "../plugins/errors.ts";
import { strerror } from "../runtime/errno.ts";

/**
 * The system's own text of an OS error, as C programs print it
 * (`strerror`): "No such file or directory", without Deno's
 * "(os error 2): writefile '/x'" or Node's "ENOENT: …, open '/x'" around
 * it, so that the caller can name the path once, its own way. Anything
 * else is returned as {@linkcode messageOf} gives it.
 *
 * @param err What was thrown.
 * @returns One line.
 *
 * @example
 * ```ts
 * import { osMessage } from "./os_message.ts";
 * const deno = new Error("No such file or directory (os error 2): writefile '/x/y'");
 * const node = new Error("ENOENT: no such file or directory, open '/x/y'");
 * const bun = Object.assign(new Error("Failed to listen at /x/y"), { code: "ENOENT" });
 * console.assert(osMessage(deno) === "No such file or directory");
 * console.assert(osMessage(node) === "No such file or directory");
 * console.assert(osMessage(bun) === "No such file or directory");
 * ```
 */
export function osMessage(err: unknown): string {
  const text = messageOf(err);
  const deno = /^(.+?) \(os error \d+\)/.exec(text);
  if (deno) return deno[1];
  const node = /^E[A-Z0-9]+: ([^,]+)/.exec(text);
  if (node) return node[1].charAt(0).toUpperCase() + node[1].slice(1);
  // Bun says "Failed to listen at PATH" and keeps the errno in `code`.
  const code = (err as { code?: unknown } | null)?.code;
  return (typeof code === "string" && strerror(code)) || text;
}

/**
 * Which connection the code running now works for, across `await`s:
 * `node:async_hooks`' `AsyncLocalStorage`, which Deno, Bun and Node all
 * provide. The server runs each connection inside it only with `-v`, so
 * that a plugin's `debug()` line names its connection as nbdkit's do
 * (`PLUGIN[N]`); without `-v` nothing is stored and nothing is paid.
 *
 * @module
 */
import { AsyncLocalStorage } from "node:async_hooks";

/**
 * The log context (`memory[3]`) of the connection being served, if any.
 *
 * @example
 * ```ts
 * import { connectionContext } from "./async_context.ts";
 * const seen = await connectionContext.run("memory[3]", async () => {
 *   await Promise.resolve();
 *   return connectionContext.getStore();
 * });
 * console.assert(seen === "memory[3]");
 * console.assert(connectionContext.getStore() === undefined);
 * ```
 */
export const connectionContext: AsyncLocalStorage<string> = new AsyncLocalStorage<string>();

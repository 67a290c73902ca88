/**
 * Debug messages from plugins, as nbdkit's `nbdkit_debug()`: printed only
 * with `-v`, in the server's format (`nbdkit-ts: PLUGIN[N]: debug: MESSAGE`
 * inside connection N, after an `await` too, as nbdkit names its connection
 * threads; `nbdkit-ts: PLUGIN: debug: MESSAGE` outside any), and nowhere
 * otherwise, so a plugin can say what it does without cluttering stderr.
 *
 * @module
 */

let sink: ((message: string) => void) | null = null;

/**
 * Print a debug message when the server runs with `-v`; do nothing
 * otherwise (the message is not even formatted by the server).
 *
 * @param message One line.
 *
 * @example In a plugin's open step
 * ```ts
 * import { debug } from "./debug.ts";
 * function open(exportName: string): string {
 *   debug(`opening ${JSON.stringify(exportName)}`);
 *   return exportName;
 * }
 * console.assert(open("disk") === "disk");
 * ```
 */
export function debug(message: string): void {
  sink?.(message);
}

/**
 * Where plugin debug messages go: the command line sets it before it loads
 * the plugin (so a module's top-level `debug()` counts too) and again under
 * the plugin's name once loaded; its logger prints only with `-v`.
 *
 * @param to The logger's debug function, or null for none.
 * @internal
 */
export function setDebugSink(to: ((message: string) => void) | null): void {
  sink = to;
}

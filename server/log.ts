/**
 * Log lines in nbdkit's format: `nbdkit-ts: PLUGIN[N]: error: MESSAGE`.
 *
 * @module
 */
import { runtime } from "../runtime/mod.ts";

/** Where log lines go. */
export type LogTarget = "stderr" | "null";

/** Logging settings, set once by the command line or `serve()`. */
export const logConfig: { target: LogTarget; verbose: boolean; program: string } = {
  target: "stderr",
  verbose: false,
  program: "nbdkit-ts",
};

/**
 * The line with its control characters (C0, DEL and C1) written as `\xNN`,
 * and U+2028/U+2029 as `\u2028`/`\u2029`: one event, one line. Export names
 * come from clients and messages from plugins, and a newline in either must
 * not forge a log line of its own (nor a C1 escape reach a terminal).
 *
 * @example
 * ```ts
 * import { oneLine } from "./log.ts";
 * console.assert(oneLine("x\nnbdkit-ts: error: forged") === "x\\x0anbdkit-ts: error: forged");
 * console.assert(oneLine("csi\u009b2J, sep\u2028") === "csi\\x9b2J, sep\\u2028");
 * console.assert(oneLine("déjà vu") === "déjà vu");
 * ```
 */
export function oneLine(line: string): string {
  let out = "";
  let from = 0;
  for (let i = 0; i < line.length; i++) {
    const c = line.charCodeAt(i);
    if (c >= 0x20 && c < 0x7f || c > 0x9f && c !== 0x2028 && c !== 0x2029) continue;
    out += line.slice(from, i) +
      (c > 0xff ? "\\u" + c.toString(16) : "\\x" + c.toString(16).padStart(2, "0"));
    from = i + 1;
  }
  return from === 0 ? line : out + line.slice(from);
}

/**
 * Which connection the code running now serves (`memory[3]`), for a
 * plugin's debug() lines. Unknown (undefined) unless the server tracks it,
 * which it does with `-v` only (serve.ts).
 */
export const logContext: { current: () => string | undefined } = { current: () => undefined };

function emit(line: string): void {
  if (logConfig.target === "stderr") runtime.writeStderr(`${oneLine(line)}\n`);
}

/** A logger bound to a context (plugin name and connection number). */
export class Logger {
  #prefix: string;

  /** Create a logger; `context` is e.g. `memory[3]`, or empty for the server itself. */
  constructor(context = "") {
    this.#prefix = context ? `${logConfig.program}: ${context}: ` : `${logConfig.program}: `;
  }

  /** An error line. */
  error(message: string): void {
    emit(`${this.#prefix}error: ${message}`);
  }

  /** A debug line, printed with `-v` only. */
  debug(message: string): void {
    if (logConfig.verbose) emit(`${this.#prefix}debug: ${message}`);
  }

  /** A line without a level. */
  info(message: string): void {
    emit(`${this.#prefix}${message}`);
  }
}

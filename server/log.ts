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

function emit(line: string): void {
  if (logConfig.target === "stderr") runtime.writeStderr(`${line}\n`);
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

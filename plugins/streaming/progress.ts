/**
 * The progress line of the streaming plugin: one line on a terminal,
 * rewritten in place a few times a second, cleared at the end.
 *
 * @module
 */
import { formatSize } from "../size.ts";

/** What one progress line says. */
export interface ProgressState {
  /** "written" or "read". */
  verb: string;
  /** Bytes streamed so far. */
  bytes: number;
  /** Bytes per second, recently (0 when unknown yet). */
  rate: number;
  /** The stream's expected length, when the user gave `size=`. */
  total: number | null;
}

/**
 * A duration for people: `0:07`, `12:34`, `1:02:03`.
 *
 * @param seconds A non-negative duration.
 * @returns The duration as `[h:]mm:ss` (minutes unpadded without hours).
 */
export function formatDuration(seconds: number): string {
  const s = Math.max(0, Math.round(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, "0");
  return h > 0 ? `${h}:${String(m).padStart(2, "0")}:${ss}` : `${m}:${ss}`;
}

/**
 * The text of a progress line.
 *
 * @param p What to say.
 * @returns One line, without line breaks or escapes.
 *
 * @example
 * ```ts
 * import { formatProgress } from "./progress.ts";
 * const line = formatProgress({ verb: "written", bytes: 512 * 2 ** 20, rate: 2 ** 28, total: 2 ** 30 });
 * console.assert(line === "streaming: 512 MiB written, 256 MiB/s, 50%, ETA 0:02");
 * ```
 */
export function formatProgress(p: ProgressState): string {
  let text = `streaming: ${formatSize(p.bytes)} ${p.verb}`;
  if (p.rate > 0) text += `, ${formatSize(Math.round(p.rate))}/s`;
  if (p.total !== null && p.total > 0) {
    const done = Math.min(p.bytes, p.total);
    text += `, ${Math.floor((done / p.total) * 100)}%`;
    if (p.rate > 0 && done < p.total) text += `, ETA ${formatDuration((p.total - done) / p.rate)}`;
  }
  return text;
}

/** Options of a {@linkcode ProgressLine}. */
export interface ProgressLineOptions {
  /** Writes text to the terminal. */
  write: (text: string) => void;
  /** Bytes streamed so far, polled at each update. */
  bytes: () => number;
  /** Whether there is anything to show yet (the stream has opened). */
  active?: () => boolean;
  /** "written" or "read". */
  verb: string;
  /** The expected length, when known. */
  total: number | null;
  /** Milliseconds between updates. */
  intervalMs?: number;
  /** The clock, in milliseconds. */
  now?: () => number;
}

/** Over how long the rate is measured. */
const RATE_SPAN_MS = 2000;

/**
 * A progress line on a terminal.
 *
 * @example Driven by hand
 * ```ts
 * import { ProgressLine } from "./progress.ts";
 * let out = "";
 * let t = 0;
 * let bytes = 0;
 * const p = new ProgressLine({
 *   write: (s) => out += s,
 *   bytes: () => bytes,
 *   verb: "written",
 *   total: null,
 *   now: () => t,
 * });
 * p.update();
 * t = 1000;
 * bytes = 1024;
 * p.update();
 * p.stop();
 * console.assert(out.endsWith("\r\x1b[K"));
 * ```
 */
export class ProgressLine {
  #o: ProgressLineOptions;
  #samples: { t: number; bytes: number }[] = [];
  #timer: ReturnType<typeof setInterval> | undefined;
  #shown = false;

  /**
   * Create a progress line (nothing is shown until it starts or updates).
   *
   * @param options Where to write and what to measure.
   */
  constructor(options: ProgressLineOptions) {
    this.#o = options;
  }

  /** Update the line every `intervalMs` until {@linkcode ProgressLine.stop}. */
  start(): void {
    this.#timer ??= setInterval(() => this.update(), this.#o.intervalMs ?? 250);
  }

  /** Rewrite the line now. */
  update(): void {
    if (this.#o.active && !this.#o.active()) return;
    const now = (this.#o.now ?? (() => performance.now()))();
    const bytes = this.#o.bytes();
    this.#samples.push({ t: now, bytes });
    while (this.#samples.length > 2 && now - this.#samples[1].t >= RATE_SPAN_MS) {
      this.#samples.shift();
    }
    const first = this.#samples[0];
    const rate = now > first.t ? ((bytes - first.bytes) * 1000) / (now - first.t) : 0;
    const text = formatProgress({ verb: this.#o.verb, bytes, rate, total: this.#o.total });
    this.#o.write(`\r${text}\x1b[K`);
    this.#shown = true;
  }

  /** Stop updating and clear the line. */
  stop(): void {
    if (this.#timer !== undefined) clearInterval(this.#timer);
    this.#timer = undefined;
    if (this.#shown) this.#o.write("\r\x1b[K");
    this.#shown = false;
  }
}

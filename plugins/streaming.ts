/**
 * `streaming write=FILE|pipe=FILE|read=FILE [size=SIZE] [window=SIZE]`:
 * a disk that is a byte stream.
 *
 * - `write=FILE` (or `pipe=FILE`, its original name): what the client writes
 *   from start to end comes out of FILE as one stream, in offset order, gaps
 *   and WRITE_ZEROES/TRIM as zeroes. Writes that arrive out of order within
 *   the reorder window (`window=`, 64 MiB) are held in memory and released
 *   in order, so clients with many writes in flight work.
 * - `read=FILE`: the stream read from FILE is served to a client that reads
 *   from start to end; the first 1 MiB and the last `window` bytes can be
 *   read again.
 * - FILE is created as a FIFO when it does not exist (the server serves
 *   while the open waits for the other end); an existing FIFO, character
 *   device or regular file is opened, a Unix socket is connected to, and
 *   `-` is standard output or input.
 * - `size=SIZE`: the disk's size; (2^63 − 2^30) rounded down to 512 bytes
 *   (effectively infinite) when absent.
 *
 * The stream is global: every connection writes (or reads) the same one.
 * When stderr is a terminal, a progress line shows how far it has got.
 *
 * @module
 */
import { messageOf, NbdError } from "./errors.ts";
import type { Plugin } from "./plugin.ts";
import { parseSize } from "./size.ts";
import { stdioSafe } from "./stdio.ts";
import { OrderedSink } from "./streaming/ordered_sink.ts";
import { ProgressLine } from "./streaming/progress.ts";
import { StreamReader } from "./streaming/stream_reader.ts";
import { StreamWriter } from "./streaming/stream_writer.ts";
import { runtime } from "../runtime/mod.ts";
import type { Connection } from "../runtime/types.ts";
import { VERSION } from "../version.ts";

/** The size when `size=` is absent: nbdkit's "effectively infinite", (2^63 − 2^30) & ~511. */
export const DEFAULT_SIZE: bigint = ((1n << 63n) - (1n << 30n)) & ~511n;

/** The reorder (write) and re-read (read) window when `window=` is absent. */
export const DEFAULT_WINDOW = 64 * 1024 * 1024;

const HELP = `write=FILE   Stream what the client writes to FILE (a FIFO, created if missing;
             a Unix socket; a file; or - for stdout). pipe=FILE is a synonym.
read=FILE    Serve the stream read from FILE (as above; - is stdin).
             Exactly one of write=, pipe= or read= is required.
size=SIZE    Size of the disk (default: effectively infinite).
window=SIZE  Out-of-order writes held in memory, or recent bytes kept for
             re-reads (default 64M).`;

/**
 * The part of the window that stages in-order writes for the pipe: an
 * eighth, at most 8 MiB. It covers a client's round trip, so the reader
 * never waits for the next request; more would only cost memory.
 *
 * @param window The window in bytes.
 * @returns The staging ring's size.
 */
export function stagingFor(window: number): number {
  return Math.min(8 * 1024 * 1024, Math.floor(window / 8));
}

type Mode = "write" | "read";
type AnyStream = WritableStream<Uint8Array> | ReadableStream<Uint8Array>;

/**
 * Create a streaming plugin with its own stream (the built-in one is such).
 *
 * @returns A fresh, unconfigured plugin.
 *
 * @example
 * ```ts
 * import { createStreamingPlugin } from "./streaming.ts";
 * const plugin = createStreamingPlugin();
 * await plugin.config!("write", "/dev/null");
 * await plugin.configComplete!();
 * await plugin.getReady!();
 * await plugin.pwrite!(null, new Uint8Array(512), 0, { fua: false });
 * await plugin.unload!();
 * ```
 */
export function createStreamingPlugin(): Plugin<null> {
  let mode: Mode | undefined;
  let file = "";
  const given: string[] = [];
  let size: bigint | null = null;
  let window = DEFAULT_WINDOW;

  let writer: StreamWriter | null = null;
  let sink: OrderedSink | null = null;
  let reader: StreamReader | null = null;
  let conn: Connection | null = null;
  let progress: ProgressLine | null = null;
  let reported = false;

  const failure = (): string | null => writer?.failure ?? reader?.failure ?? null;
  const describe = (): string =>
    file === "-" ? (mode === "write" ? "standard output" : "standard input") : `'${file}'`;

  /**
   * Open FILE for the mode. The stream is wrapped in an object because a
   * FIFO's open must not be awaited here: it waits for the other end.
   */
  async function target(): Promise<{ stream: Promise<AnyStream> }> {
    if (file === "-") {
      if (!stdioSafe()) {
        const key = given[0];
        throw new Error(
          `${key}=- cannot be used with -s: standard input and output carry the NBD connection`,
        );
      }
      const std = mode === "write" ? runtime.stdoutStream() : runtime.stdinStream();
      return { stream: Promise.resolve(std) };
    }
    let info = await runtime.stat(file);
    if (info === null) {
      await runtime.mkfifo(file);
      info = { kind: "fifo", size: 0 };
    }
    const open = (): Promise<AnyStream> =>
      mode === "write" ? runtime.openWriteStream(file) : runtime.openReadStream(file);
    switch (info.kind) {
      case "fifo":
        return { stream: open() };
      case "socket": {
        const c = await runtime.connectUnix(file);
        conn = c;
        return { stream: Promise.resolve(mode === "write" ? c.writable : c.readable) };
      }
      case "directory":
        throw new Error(`${file}: is a directory`);
      default: {
        const stream = await open();
        return { stream: Promise.resolve(stream) };
      }
    }
  }

  function stopped(): void {
    // A progress line left on screen would swallow the start of the error lines that follow.
    progress?.stop();
    progress = null;
  }

  /** Run a callback, noting whether the error state reached a client (and so the log). */
  async function guard<T>(fn: () => T | Promise<T>): Promise<T> {
    try {
      return await fn();
    } catch (err) {
      if (failure() !== null) reported = true;
      throw err;
    }
  }

  function active(): StreamWriter | StreamReader {
    const engine = writer ?? reader;
    if (!engine) throw new NbdError("EIO", "The streaming plugin is not ready");
    engine.check();
    return engine;
  }

  return {
    name: "streaming",
    longname: "nbdkit-ts streaming plugin",
    version: VERSION,
    configHelp: HELP,
    threadModel: "parallel",
    preadFillsBuffer: true,

    config(key, value) {
      switch (key) {
        case "pipe":
        case "write":
        case "read":
          given.push(key);
          mode = key === "read" ? "read" : "write";
          file = value;
          if (value === "") throw new Error(`${key}= needs a file name`);
          return;
        case "size":
          size = parseSize(value);
          return;
        case "window": {
          const w = parseSize(value);
          if (w > BigInt(Number.MAX_SAFE_INTEGER)) throw new Error(`window=${value} is too large`);
          window = Number(w);
          return;
        }
        default:
          throw new Error(`unknown parameter '${key}'`);
      }
    },

    configComplete() {
      if (given.length === 0) {
        throw new Error("one of the parameters write=FILE (or pipe=FILE) or read=FILE is required");
      }
      if (given.length > 1) {
        throw new Error(
          `only one of the parameters pipe=, write= or read= may be given, ` +
            `not ${given.map((k) => `${k}=`).join(" and ")}`,
        );
      }
    },

    async getReady() {
      const opened = (await target()).stream;
      const name = describe();
      if (mode === "write") {
        let w: StreamWriter | null = null;
        const out = new OrderedSink(opened as Promise<WritableStream<Uint8Array>>, {
          stagingBytes: stagingFor(window),
          onError(err, written) {
            const why = messageOf(err);
            w?.fail(
              /broken pipe|EPIPE/i.test(`${why} ${(err as { code?: string })?.code ?? ""}`)
                ? `The reader of ${name} went away (broken pipe) after ${written} bytes`
                : `Cannot write to ${name} at offset ${written}: ${why}`,
            );
          },
        });
        w = new StreamWriter({ sink: out, window, onFailure: stopped });
        writer = w;
        sink = out;
        if (runtime.stderrIsTerminal()) {
          progress = new ProgressLine({
            write: (t) => runtime.writeStderr(t),
            bytes: () => out.written,
            active: () => out.isOpen,
            verb: "written",
            total: size === null ? null : Number(size),
          });
        }
      } else {
        reader = new StreamReader({
          source: opened as Promise<ReadableStream<Uint8Array>>,
          window,
          name,
          readahead: Math.min(4 * 1024 * 1024, window),
          onFailure: stopped,
        });
        const r = reader;
        if (runtime.stderrIsTerminal()) {
          progress = new ProgressLine({
            write: (t) => runtime.writeStderr(t),
            bytes: () => r.position,
            active: () => r.position > 0,
            verb: "read",
            total: size === null ? null : Number(size),
          });
        }
      }
      progress?.start();
    },

    async unload() {
      try {
        if (sink && !sink.isOpen && writer && writer.failure === null && writer.highest > 0) {
          // Acknowledged bytes must reach the reader: say why the server does not exit yet.
          progress?.stop();
          runtime.writeStderr(
            `nbdkit-ts: streaming: waiting for a reader to open ${describe()} ` +
              `(${writer.highest} bytes to deliver)\n`,
          );
        }
        await writer?.finish();
        await reader?.close();
      } finally {
        conn?.close();
        progress?.stop();
        // A failure no request reported (the reader left after the last write) still gets its line.
        const why = failure();
        if (why !== null && !reported) runtime.writeStderr(`nbdkit-ts: streaming: error: ${why}\n`);
      }
    },

    open() {
      return guard(() => {
        active();
        return null;
      });
    },

    getSize: () => size ?? DEFAULT_SIZE,
    canWrite: () => mode === "write",
    canFlush: () => mode === "write",
    canTrim: () => mode === "write",
    canZero: () => mode === "write",
    canFastZero: () => false,
    // FUA would have to flush, and a flush ends the reordering of what is in flight.
    canFua: () => "none",
    canMultiConn: () => false,
    canCache: () => "none",

    pread: (_h, buf, offset) => guard(() => active().read(buf, offset)),
    pwrite: (_h, buf, offset) => guard(() => writing().write(buf, offset)),
    zero: (_h, count, offset) => guard(() => writing().zero(count, offset)),
    trim: (_h, count, offset) => guard(() => writing().zero(count, offset)),
    flush: () => guard(() => writing().flush()),
  };

  function writing(): StreamWriter {
    const engine = active();
    if (!(engine instanceof StreamWriter)) {
      throw new NbdError(
        "EPERM",
        "The streaming plugin is reading a stream (read=): it cannot write",
      );
    }
    return engine;
  }
}

/** The streaming plugin, as `nbdkit-ts streaming` loads it. */
const streaming: Plugin<null> = createStreamingPlugin();
export default streaming;

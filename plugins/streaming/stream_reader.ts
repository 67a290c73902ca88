/**
 * Read mode of the streaming plugin: one byte stream in, served to a client
 * that reads the disk from start to end.
 *
 * Reads ahead of the stream consume it (a forward skip discards bytes);
 * re-reads are served from what is retained (the first bytes and the most
 * recent window). A read of bytes no longer retained stops the plugin: an
 * error state every later request reports. The stream ending before the
 * export does fails only the reads past its end.
 *
 * @module
 */
import { messageOf, NbdError } from "../errors.ts";
import { ErrorState } from "./error_state.ts";
import { formatSize } from "../size.ts";
import { RetainedBytes } from "./retained_bytes.ts";

/** Bytes from the start of the stream that are always kept. */
export const HEAD_SIZE = 1024 * 1024;

/**
 * The buffer each read of a byte stream fills (a pipe's size: a full pipe
 * is taken in one read).
 */
export const READ_CHUNK = 1024 * 1024;

/**
 * Buffers that left the window and wait to be read into again. Fresh ones
 * cost the kernel a page fault per 4 KiB as it copies into them: 1 GiB from a
 * FIFO took 0.9 s in `read(2)` that way, on the server's one thread.
 */
const SPARE_BUFFERS = 8;

/** Options of a {@linkcode StreamReader}. */
export interface StreamReaderOptions {
  /** The stream, once it is open (a rejection stops the reader). */
  source: Promise<ReadableStream<Uint8Array>>;
  /** How many recent bytes are kept for re-reads. */
  window: number;
  /** What the stream is, for messages ("'/tmp/fifo'", "standard input"). */
  name: string;
  /** Bytes kept from the start; {@linkcode HEAD_SIZE} by default. */
  headSize?: number;
  /** Bytes read beyond the latest request, to overlap the source with the client. */
  readahead?: number;
  /** Called once when the reader enters its error state. */
  onFailure?: (message: string) => void;
}

/**
 * The engine of read mode.
 *
 * @example
 * ```ts
 * import { StreamReader } from "./stream_reader.ts";
 * const source = new ReadableStream<Uint8Array>({
 *   start(c) {
 *     c.enqueue(new Uint8Array([1, 2, 3, 4]));
 *     c.close();
 *   },
 * });
 * const r = new StreamReader({ source: Promise.resolve(source), window: 16, name: "test" });
 * const buf = new Uint8Array(2);
 * await r.read(buf, 2);
 * console.assert(buf.join() === "3,4");
 * await r.close();
 * ```
 */
export class StreamReader extends ErrorState {
  #source: Promise<ReadableStream<Uint8Array>>;
  #reader: ReadableStreamDefaultReader<Uint8Array> | ReadableStreamBYOBReader | null = null;
  #byob = false;
  #spare: ArrayBuffer[] = [];
  #retained: RetainedBytes;
  #window: number;
  #name: string;
  #readahead: number;
  #eof = false;
  #filling: Promise<void> | null = null;
  #closed = false;

  /**
   * Create the engine.
   *
   * @param options The source and the retention policy.
   */
  constructor(options: StreamReaderOptions) {
    super(options.onFailure);
    this.#source = options.source;
    this.#window = options.window;
    this.#name = options.name;
    this.#readahead = options.readahead ?? 0;
    this.#retained = new RetainedBytes(
      options.headSize ?? HEAD_SIZE,
      options.window,
      (buffer) => this.#recycle(buffer),
    );
    this.#source.catch((err) => this.fail(`Cannot open ${this.#name}: ${messageOf(err)}`));
  }

  /** Bytes consumed from the stream so far. */
  get position(): number {
    return this.#retained.end;
  }

  /** Whether the stream has ended. */
  get ended(): boolean {
    return this.#eof;
  }

  /**
   * Fill `buf` with the stream's bytes at `offset`.
   *
   * @param buf Where the bytes go.
   * @param offset The offset in the stream.
   */
  async read(buf: Uint8Array, offset: number): Promise<void> {
    this.check();
    const end = offset + buf.length;
    if (end > this.#retained.end) await this.#fill(end);
    this.check();
    if (end > this.#retained.end) {
      throw new NbdError(
        "EIO",
        `The stream ended at offset ${this.#retained.end}, before the end of the read at ` +
          `offset ${offset} (${buf.length} bytes)`,
      );
    }
    if (!this.#retained.copyOut(buf, offset)) {
      this.fail(
        `Cannot read offset ${offset} (${buf.length} bytes) again: the stream is at offset ` +
          `${this.#retained.end}, and only its first ${formatSize(HEAD_SIZE)} and its last ` +
          `${formatSize(this.#window)} (window=) are kept`,
      );
      this.check();
    }
    if (this.#readahead > 0 && !this.#eof) {
      this.#fill(end + this.#readahead).catch(() => {});
    }
  }

  /** Stop reading the source. */
  async close(): Promise<void> {
    this.#closed = true;
    if (this.#reader) {
      await this.#reader.cancel().catch(() => {});
    } else {
      this.#source.then((s) => s.cancel().catch(() => {}), () => {});
    }
  }

  async #fill(end: number): Promise<void> {
    while (
      this.#retained.end < end && !this.#eof && this.failure === null && !this.#closed
    ) {
      this.#filling ??= this.#readOne().finally(() => this.#filling = null);
      await this.#filling;
    }
  }

  /** The stream's reader: a BYOB one where the stream is a byte stream, so that buffers are reused. */
  async #openReader(): Promise<ReadableStreamDefaultReader<Uint8Array> | ReadableStreamBYOBReader> {
    const source = await this.#source;
    try {
      const byob = source.getReader({ mode: "byob" });
      this.#byob = true;
      return byob;
    } catch {
      return source.getReader();
    }
  }

  #recycle(buffer: ArrayBufferLike): void {
    if (
      this.#byob && buffer instanceof ArrayBuffer && buffer.byteLength === READ_CHUNK &&
      this.#spare.length < SPARE_BUFFERS
    ) this.#spare.push(buffer);
  }

  async #readOne(): Promise<void> {
    try {
      this.#reader ??= await this.#openReader();
      const { value, done } = this.#byob
        ? await (this.#reader as ReadableStreamBYOBReader).read(
          new Uint8Array(this.#spare.pop() ?? new ArrayBuffer(READ_CHUNK)),
        )
        : await (this.#reader as ReadableStreamDefaultReader<Uint8Array>).read();
      if (done) this.#eof = true;
      else this.#retained.append(value);
    } catch (err) {
      this.fail(`Cannot read ${this.#name} at offset ${this.#retained.end}: ${messageOf(err)}`);
    }
  }
}

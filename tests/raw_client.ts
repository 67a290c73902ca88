/**
 * A byte-level NBD client for tests that must send what real clients never
 * would: garbage flags, bad magic, oversized options and requests.
 *
 * @module
 */
import { connect, type Socket } from "node:net";

/** NBD option and command numbers used by the tests. */
export const OPT = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  GO: 7,
  STRUCTURED_REPLY: 8,
  SET_META_CONTEXT: 10,
} as const;
/** Commands. */
export const CMD = { READ: 0, WRITE: 1, DISC: 2, FLUSH: 3, TRIM: 4, ZERO: 6, STATUS: 7 } as const;

/** A raw connection with exact-length reads. */
export class RawClient {
  #socket: Socket;
  #buffered: Uint8Array[] = [];
  #length = 0;
  #ended = false;
  #waiter: (() => void) | null = null;

  protected constructor(socket: Socket) {
    this.#socket = socket;
    socket.on("data", (d: Buffer) => {
      this.#buffered.push(d);
      this.#length += d.length;
      this.#wake();
    });
    const end = () => {
      this.#ended = true;
      this.#wake();
    };
    socket.on("end", end);
    socket.on("close", end);
    socket.on("error", end);
  }

  #wake(): void {
    const w = this.#waiter;
    this.#waiter = null;
    w?.();
  }

  /** Until data arrives, the connection ends, or 50 ms pass. */
  #wait(): Promise<void> {
    return new Promise<void>((resolve) => {
      this.#waiter = resolve;
      setTimeout(resolve, 50);
    });
  }

  /** Open a connection to a Unix socket, for `connect` here and in subclasses. */
  protected static open(path: string): Promise<Socket> {
    return new Promise((resolve, reject) => {
      const s = connect({ path }, () => resolve(s));
      s.once("error", reject);
    });
  }

  /** Connect to a Unix socket. */
  static async connect(path: string): Promise<RawClient> {
    return new RawClient(await RawClient.open(path));
  }

  /** Send bytes (errors are ignored: the server may have closed). */
  send(bytes: Uint8Array): void {
    if (!this.#socket.destroyed) this.#socket.write(bytes, () => {});
  }

  /**
   * Read exactly `n` bytes (copied out of the received chunks), or null if the
   * server closed first. Times out after `ms`.
   */
  async read(n: number, ms = 10_000): Promise<Uint8Array | null> {
    const deadline = Date.now() + ms;
    while (this.#length < n) {
      if (this.#ended) return null;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
      await this.#wait();
    }
    const out = new Uint8Array(n);
    let at = 0;
    while (at < n) {
      const head = this.#buffered[0];
      const take = Math.min(head.length, n - at);
      out.set(head.subarray(0, take), at);
      at += take;
      if (take === head.length) this.#buffered.shift();
      else this.#buffered[0] = head.subarray(take);
    }
    this.#length -= n;
    return out;
  }

  /** Resolves true when the server closes the connection within `ms`. */
  async closedWithin(ms: number): Promise<boolean> {
    const deadline = Date.now() + ms;
    while (!this.#ended) {
      if (Date.now() > deadline) return false;
      await this.#wait();
    }
    return true;
  }

  /** Close abruptly. */
  destroy(): void {
    this.#socket.destroy();
  }

  /** Read the 18-byte greeting and send client flags. */
  async greet(clientFlags = 3): Promise<number> {
    const g = await this.read(18);
    if (!g) throw new Error("no greeting");
    this.send(u32(clientFlags));
    return view(g).getUint16(16);
  }

  /** Send an option. */
  option(option: number, data: Uint8Array = new Uint8Array(0), length = data.length): void {
    this.send(optionBytes(option, data, length));
  }

  /** Read one option reply header and payload. */
  async optionReply(): Promise<{ option: number; type: number; data: Uint8Array } | null> {
    const h = await this.read(20);
    if (!h) return null;
    const v = view(h);
    const len = v.getUint32(16);
    const data = len > 0 ? await this.read(len) : new Uint8Array(0);
    return { option: v.getUint32(8), type: v.getUint32(12), data: data ?? new Uint8Array(0) };
  }

  /** Negotiate GO on the default export (no structured replies); returns size and flags. */
  async go(exportName = ""): Promise<{ size: bigint; flags: number }> {
    await this.greet();
    return await this.sendGo(exportName);
  }

  /**
   * NBD_OPT_GO after options of the caller's own: the export's size and
   * flags; throws unless the server answers with its ACK.
   */
  async sendGo(exportName = ""): Promise<{ size: bigint; flags: number }> {
    const name = new TextEncoder().encode(exportName);
    this.option(OPT.GO, concat(u32(name.length), name, u16(0)));
    let size = -1n;
    let flags = 0;
    while (true) {
      const r = await this.optionReply();
      if (!r) throw new Error("closed during GO");
      if (r.type === 1) break;
      if (r.type >= 0x80000000) throw new Error(`GO failed: 0x${r.type.toString(16)}`);
      const v = view(r.data);
      if (v.getUint16(0) === 0) {
        size = v.getBigUint64(2);
        flags = v.getUint16(10);
      }
    }
    return { size, flags };
  }

  /** Send a request. */
  request(
    type: number,
    offset: bigint,
    count: number,
    options: RequestOptions = {},
  ): void {
    this.send(requestBytes(type, offset, count, options));
  }

  /**
   * Read a simple reply; returns its error and cookie, or null when closed.
   * Times out after `ms` without the header.
   */
  async simpleReply(
    dataLength = 0,
    ms = 10_000,
  ): Promise<{ error: number; cookie: bigint; data: Uint8Array } | null> {
    const h = await this.read(16, ms);
    if (!h) return null;
    const v = view(h);
    if (v.getUint32(0) !== 0x67446698) throw new Error("not a simple reply");
    const error = v.getUint32(4);
    const data = error === 0 && dataLength > 0 ? await this.read(dataLength) : new Uint8Array(0);
    return { error, cookie: v.getBigUint64(8), data: data ?? new Uint8Array(0) };
  }
}

/** The bytes of an option (IHAVEOPT, option, length, data); `length` may lie. */
export function optionBytes(
  option: number,
  data: Uint8Array = new Uint8Array(0),
  length = data.length,
): Uint8Array {
  return concat(u64(0x49484156454f5054n), u32(option), u32(length), data);
}

/** What a request may set besides type, offset and count. */
export interface RequestOptions {
  flags?: number;
  cookie?: bigint;
  payload?: Uint8Array;
  magic?: number;
}

/** The bytes of a request header (and payload, if given); cookie 1 unless told. */
export function requestBytes(
  type: number,
  offset: bigint,
  count: number,
  options: RequestOptions = {},
): Uint8Array {
  return concat(
    u32(options.magic ?? 0x25609513),
    u16(options.flags ?? 0),
    u16(type),
    u64(options.cookie ?? 1n),
    u64(offset),
    u32(count),
    options.payload ?? new Uint8Array(0),
  );
}

/** A DataView over exactly the bytes of `b`. */
export function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Bytes of a u16. */
export function u16(n: number): Uint8Array {
  const b = new Uint8Array(2);
  new DataView(b.buffer).setUint16(0, n);
  return b;
}

/** Bytes of a u32. */
export function u32(n: number): Uint8Array {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, n);
  return b;
}

/** Bytes of a u64. */
export function u64(n: bigint): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, n);
  return b;
}

/** Concatenate. */
export function concat(...parts: Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

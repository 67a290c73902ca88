/**
 * The Node adapter. It uses only `node:` modules, so Bun runs it too; the Bun
 * adapter (`bun.ts`) starts from it and replaces the sockets.
 *
 * @module
 */
import * as net from "node:net";
import * as dns from "node:dns/promises";
import * as fs from "node:fs";
import * as fsp from "node:fs/promises";
import { spawn } from "node:child_process";
import { Duplex, type Readable, type Writable } from "node:stream";
import { finished } from "node:stream/promises";
import * as tls from "node:tls";
import * as tty from "node:tty";
import { createPrivateKey, X509Certificate } from "node:crypto";
import * as os from "node:os";
import * as nodeModule from "node:module";
import { dirname, join, resolve } from "node:path";
import { pathToFileURL } from "node:url";
// Not `import process from "node:process"`: Node builds that module by
// reading every property of `process`, stdout's getter among them, which
// makes a piped stdout nonblocking for every process that shares the pipe
// (`nbdcopy -- [ nbdkit-ts … ] - | sha256sum` failed with EAGAIN).
const process = globalThis.process;
import type {
  Connection,
  ExitStatus,
  FileInfo,
  FileKind,
  Listener,
  PemFile,
  RandomAccessFile,
  Runtime,
  ShellChild,
  SignalName,
  SpawnOptions,
  TlsServerOptions,
} from "./types.ts";
import { enlargePipeFd, PIPE_SIZE, pipeCapacity, type PipeLibc } from "./pipe_size.ts";
import { FIONREAD, pacedPipeWritable } from "./paced_pipe.ts";
import {
  CachedReads,
  endOfFileError,
  type FileExtras,
  fileExtras,
  type FileSyscalls,
  refuseUnseekable,
  SEEK_END,
  syscallError,
  sysfsSizePath,
} from "./file_syscalls.ts";
import { koffiFileSyscalls } from "./node_file_syscalls.ts";

const encoder = new TextEncoder();

/**
 * Bytes a connection's readable side queues before the socket is paused:
 * room for many pipelined requests with their payloads, yet a bound on what a
 * client that sends faster than we serve can make us hold.
 */
export const READ_HIGH_WATER_MARK: number = 4 << 20;

/** Chunk size of reads from regular files and devices opened as streams. */
const FILE_CHUNK = 256 << 10;

let typeScriptHooks = false;

/** Let Node import `.ts` plugins (see node_ts_hooks.ts); once, and only when one is loaded. */
function registerTypeScriptHooks(): void {
  if (typeScriptHooks) return;
  typeScriptHooks = true;
  // The npm build compiles this file to .js beside the built hooks.
  const ext = import.meta.url.endsWith(".ts") ? "ts" : "js";
  (nodeModule as { register?: (url: URL) => void }).register?.(
    new URL(`./node_ts_hooks.${ext}`, import.meta.url),
  );
}

function errnoCode(err: unknown): string | undefined {
  return (err as { code?: unknown })?.code as string | undefined;
}

/**
 * Make `chunk` safe to enqueue in a byte stream. Enqueueing transfers the
 * chunk's whole ArrayBuffer; when the chunk is a view into a pool shared with
 * other buffers (Node's small-buffer pool, fs read streams), transferring it
 * would detach memory that others still use, so such chunks are copied.
 *
 * @param chunk A chunk received from a Node stream or socket.
 * @returns The chunk itself, or a copy that owns its buffer.
 */
export function ownedChunk(chunk: Uint8Array): Uint8Array<ArrayBuffer> {
  const whole = chunk.byteOffset === 0 && chunk.byteLength === chunk.buffer.byteLength;
  return whole && chunk.buffer instanceof ArrayBuffer
    ? chunk as Uint8Array<ArrayBuffer>
    : new Uint8Array(chunk);
}

/**
 * Turn a Node `Readable` that emits bytes into a web byte stream (so BYOB
 * readers work). Backpressure pauses the source once
 * {@linkcode READ_HIGH_WATER_MARK} bytes are queued, and resumes it when the
 * consumer pulls. An `error` event errors the stream; `end` or `close` ends it.
 *
 * @param src The source; an `error` listener is attached so that a peer's
 *   reset never becomes an uncaught exception.
 * @param onCancel Called when the consumer cancels the stream.
 * @param hold Told when the source is paused (true) and resumed (false), for
 *   sources that go on reading what is under them while paused (Deno's TLS
 *   socket over streams).
 * @returns The readable side.
 */
export function readableFromNode(
  src: Readable,
  onCancel: () => void,
  hold?: (held: boolean) => void,
): ReadableStream<Uint8Array> {
  return nodeByteStream(src, onCancel, hold, (push) => {
    src.on("data", (chunk: Uint8Array) => push(ownedChunk(chunk), false));
  });
}

/**
 * The web byte stream of {@linkcode readableFromNode}, fed by `attach`'s
 * calls of `push`: with `reused`, the bytes' buffer is read into again
 * once `push` returns, so they are copied (straight into a BYOB reader's
 * buffer when one waits); otherwise the stream takes the buffer over.
 */
function nodeByteStream(
  src: Readable,
  onCancel: () => void,
  hold: ((held: boolean) => void) | undefined,
  attach: (push: (bytes: Uint8Array<ArrayBuffer>, reused: boolean) => void) => void,
): ReadableStream<Uint8Array> {
  let done = false;
  let paused = false;
  return new ReadableStream({
    type: "bytes",
    start(controller) {
      const finish = (err?: Error) => {
        if (done) return;
        done = true;
        if (err) {
          controller.error(err);
        } else {
          controller.close();
          // A BYOB read waiting for bytes must be told there are none.
          controller.byobRequest?.respond(0);
        }
      };
      attach((bytes, reused) => {
        if (done || bytes.byteLength === 0) return;
        if (!reused) {
          controller.enqueue(bytes);
        } else {
          const view = controller.byobRequest?.view;
          const n = view ? Math.min(view.byteLength, bytes.length) : 0;
          if (view) {
            new Uint8Array(view.buffer, view.byteOffset, n).set(bytes.subarray(0, n));
            controller.byobRequest!.respond(n);
          }
          if (n < bytes.length) controller.enqueue(bytes.slice(n));
        }
        if (!paused && (controller.desiredSize ?? 0) <= 0) {
          paused = true;
          src.pause();
          hold?.(true);
        }
      });
      src.on("end", () => finish());
      src.on("close", () => finish());
      src.on("error", (err: Error) => finish(err));
    },
    pull() {
      if (paused) {
        paused = false;
        hold?.(false);
        src.resume();
      }
    },
    cancel() {
      done = true;
      onCancel();
    },
  }, { highWaterMark: READ_HIGH_WATER_MARK });
}

/**
 * Turn a Node `Writable` into a web writable stream. A write resolves as soon
 * as `dst.write()` accepts the chunk, or on `drain` when it answers that its
 * buffer is full. Writes made in the same tick are corked and go out together
 * in one `writev(2)` on the next tick: replies to pipelined requests cost one
 * system call, not one each (this triples small-request throughput).
 *
 * Node keeps a reference to each chunk until it is sent: a chunk must not be
 * modified once written.
 *
 * @param dst The destination. An `error` listener is attached: errors error
 *   the web stream instead of becoming uncaught exceptions.
 * @param onClose Called by the web stream's `close()`; by default `end()`
 *   (for a socket opened with allowHalfOpen: a FIN that leaves reading open).
 * @param room After each write `dst` accepted: undefined, or a promise to
 *   wait for first, for destinations whose `write()` accepts without bound
 *   (Bun's TLS socket over streams).
 * @returns The writable side.
 */
export function writableFromNode(
  dst: Writable,
  onClose: () => Promise<void> = () => endWritable(dst),
  room?: () => Promise<void> | undefined,
): WritableStream<Uint8Array> {
  let corked = false;
  let failure: Error | null = null;
  let wake: ((err?: Error) => void) | null = null;
  let controller!: WritableStreamDefaultController;
  const uncork = () => {
    corked = false;
    dst.uncork();
  };
  const fail = (err: Error) => {
    failure ??= err;
    wake?.(failure);
    controller.error(failure);
  };
  dst.on("error", fail);
  dst.on("close", () => fail(new Error("Connection closed")));
  dst.on("drain", () => wake?.());
  return new WritableStream<Uint8Array>({
    start(c) {
      controller = c;
    },
    write(chunk) {
      if (failure) throw failure;
      if (chunk.byteLength === 0) return;
      if (!corked) {
        corked = true;
        dst.cork();
        process.nextTick(uncork);
      }
      if (dst.write(chunk)) return room?.();
      return new Promise<void>((resolve, reject) => {
        wake = (err) => {
          wake = null;
          if (err) reject(err);
          else resolve();
        };
      });
    },
    close: onClose,
    abort() {
      dst.destroy();
    },
  });
}

/** `end()` a Node writable and wait until everything written has been sent. */
function endWritable(dst: Writable): Promise<void> {
  return new Promise((resolve, reject) => {
    dst.end((err?: Error | null) => err ? reject(err) : resolve());
  });
}

/**
 * Destroy a Node stream after handing the kernel whatever it takes at once of
 * the chunks that writes have already resolved for (corked or queued).
 */
function destroyNow(dst: Writable): void {
  while (dst.writableCorked > 0) dst.uncork();
  dst.destroy();
}

function socketConnection(sock: net.Socket): Connection {
  return {
    // Cancelling only the reading half must leave the writing half usable.
    readable: readableFromNode(sock, () => sock.pause()),
    writable: writableFromNode(sock),
    close: () => destroyNow(sock),
    startTls(options) {
      // TLS takes over the socket's handle: the plain stream must neither
      // hold back the STARTTLS reply (corked) nor see the TLS bytes.
      while (sock.writableCorked > 0) sock.uncork();
      sock.removeAllListeners("data");
      sock.pause();
      return secureServer(sock, options, () => sock.destroy());
    },
  };
}

/** Secure contexts made by {@linkcode prepareNodeTls}, one per configuration. */
const secureContexts = new WeakMap<TlsServerOptions, tls.SecureContext>();

/**
 * Cipher suites offered with pre-shared keys: TLS 1.3's, and TLS 1.2's PSK
 * suites, which Node's default list excludes.
 */
const PSK_CIPHERS = "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256:TLS_AES_128_GCM_SHA256:" +
  "ECDHE-PSK-CHACHA20-POLY1305:ECDHE-PSK-AES256-CBC-SHA384:ECDHE-PSK-AES128-CBC-SHA256:" +
  "PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305";

/** An error's message on one line (OpenSSL's may span several). */
function oneLine(err: unknown): string {
  return String((err as Error)?.message ?? err).replace(/\s+/g, " ").trim();
}

function parsePem<T>(file: PemFile, what: string, parse: (pem: string) => T): T {
  try {
    return parse(file.pem);
  } catch (err) {
    throw new Error(`${file.path}: not a usable ${what}: ${oneLine(err)}`);
  }
}

/**
 * Check TLS credentials and make their secure context, once. The key,
 * certificates and their match are checked one by one first, so that the
 * message names the culprit file (and because Deno's `createSecureContext`
 * checks nothing).
 *
 * @param options The credentials, as read by `server/tls.ts`.
 * @throws {Error} A one-line message when something cannot be used.
 */
export function prepareNodeTls(options: TlsServerOptions): void {
  if (secureContexts.has(options)) return;
  const { cert, key, ca, crl } = options;
  if (cert && key) {
    const certificate = parsePem(cert, "certificate", (pem) => new X509Certificate(pem));
    const privateKey = parsePem(key, "private key", (pem) => createPrivateKey(pem));
    if (!certificate.checkPrivateKey(privateKey)) {
      throw new Error(`${key.path}: the private key does not belong to ${cert.path}`);
    }
  }
  if (ca) parsePem(ca, "CA certificate", (pem) => new X509Certificate(pem));
  try {
    secureContexts.set(
      options,
      tls.createSecureContext({
        cert: cert?.pem,
        key: key?.pem,
        ca: ca?.pem,
        crl: crl?.pem,
        ciphers: options.psk ? PSK_CIPHERS : undefined,
      }),
    );
  } catch (err) {
    throw new Error(`cannot use the TLS credentials: ${oneLine(err)}`);
  }
}

/**
 * Why a client's certificate is refused, or null when it is accepted. Node
 * works the verdict out during the handshake but sets `authorized` only on
 * the sockets of a `tls.Server`; a lone TLSSocket answers through
 * `ssl.verifyError()`. Bun sets `authorized`. Anything else is refused.
 */
function peerRefusal(sock: tls.TLSSocket): string | null {
  const cert = sock.getPeerCertificate();
  if (!cert || Object.keys(cert).length === 0) return "the client sent no certificate";
  if (sock.authorized) return null;
  const ssl = (sock as unknown as { ssl?: { verifyError?: () => Error | null | undefined } }).ssl;
  if (typeof ssl?.verifyError === "function") {
    const verdict = ssl.verifyError();
    if (verdict == null) return null;
    return `the client's certificate was refused: ${
      (verdict as { code?: string }).code ?? oneLine(verdict)
    }`;
  }
  return `the client's certificate could not be verified: ${
    sock.authorizationError ?? "no verdict"
  }`;
}

/**
 * Run the server side of a TLS handshake over `transport` and resolve, once
 * it has finished and the peer is accepted, with the protected connection.
 *
 * @param transport A connected socket, or any duplex carrying the bytes.
 * @param options The credentials (prepared by {@linkcode prepareNodeTls}).
 * @param closeTransport Ends the transport for good.
 * @param overStreams For a transport made of web streams: what bounds the
 *   TLS socket's reading and writing, and what ends it.
 * @returns The TLS connection.
 */
function secureServer(
  transport: net.Socket | Duplex,
  options: TlsServerOptions,
  closeTransport: () => void,
  overStreams?: TransportFlow,
): Promise<Connection> {
  prepareNodeTls(options);
  const psk = options.psk;
  const wantCert = options.verifyPeer && !psk;
  const sock = new tls.TLSSocket(transport, {
    isServer: true,
    secureContext: secureContexts.get(options),
    requestCert: wantCert,
    rejectUnauthorized: wantCert,
    // An unknown identity gets null: the handshake fails with unknown_psk_identity.
    ...(psk ? { pskCallback: (_: unknown, identity: string) => psk.get(identity) ?? null } : {}),
  } as tls.TLSSocketOptions);
  // Deno's TLS socket outlives a transport made of streams that failed: its
  // writes would go on succeeding, and the requests left be served for nobody.
  if (overStreams) transport.once("close", () => sock.destroy());
  return new Promise((resolve, reject) => {
    const cleanup = () => {
      sock.off("error", fail);
      sock.off("end", closed);
      sock.off("close", closed);
    };
    function fail(err: Error): void {
      cleanup();
      sock.destroy();
      closeTransport();
      // Node's OpenSSL errors carry the short reason beside a long message.
      const reason = (err as { reason?: unknown }).reason;
      reject(
        new Error(`TLS handshake failed: ${typeof reason === "string" ? reason : oneLine(err)}`),
      );
    }
    function closed(): void {
      fail(new Error("the connection was closed"));
    }
    sock.once("error", fail);
    // The socket is half-open: a client that leaves mid-handshake ends it, without a close.
    sock.once("end", closed);
    sock.once("close", closed);
    sock.once("secure", () => {
      const refusal = wantCert ? peerRefusal(sock) : null;
      if (refusal) return fail(new Error(refusal));
      cleanup();
      resolve({
        readable: readableFromNode(sock, () => sock.pause(), overStreams?.hold),
        writable: writableFromNode(
          sock,
          overStreams ? () => endWritable(sock).then(overStreams.sent) : undefined,
          overStreams?.room,
        ),
        close() {
          destroyNow(sock);
          closeTransport();
        },
      });
    });
  });
}

/**
 * TLS over any connection, through its web streams: for connections that
 * are not Node sockets (Deno's, Bun's, standard input and output). Bytes
 * before the STARTTLS reply must all have been read; nobody may hold a
 * reader or writer of `conn`.
 *
 * @param conn The plain connection.
 * @param options The credentials (see {@linkcode prepareNodeTls}).
 * @returns The TLS connection, once the handshake has finished.
 */
export function startTlsOverStreams(
  conn: Connection,
  options: TlsServerOptions,
): Promise<Connection> {
  const reader = conn.readable.getReader();
  const writer = conn.writable.getWriter();
  let reading = false;
  let held = false;
  let wanted = false;
  let roomWaiter: ((err?: Error) => void) | null = null;
  const read = () => {
    if (held) {
      wanted = true;
      return;
    }
    if (reading) return;
    reading = true;
    pump().catch((err) => transport.destroy(err));
  };
  const pump = async (): Promise<void> => {
    while (true) {
      const { value, done } = await reader.read();
      // An empty push would stall the stream: Node does not ask again.
      if (done || value.byteLength > 0) {
        reading = false;
        transport.push(done ? null : value);
        return;
      }
    }
  };
  const transport: Duplex = new Duplex({
    read,
    write(chunk: Uint8Array, _encoding, callback) {
      writer.write(chunk).then(() => {
        callback();
        if (roomWaiter && transport.writableLength <= TLS_WRITE_LOW) roomWaiter();
      }, callback);
    },
    final(callback) {
      writer.close().then(() => callback(), callback);
    },
    destroy(err, callback) {
      reader.cancel().catch(() => {});
      conn.close();
      callback(err);
    },
  });
  // Deno's and Bun's TLS sockets neither stop reading the transport when
  // paused nor wait for it to take what they write: without these bounds a
  // client that sends requests and reads no reply grows the server without
  // limit (Deno holds the requests, Bun the replies).
  const flow: TransportFlow = {
    hold(on) {
      held = on;
      if (!on && wanted) {
        wanted = false;
        read();
      }
    },
    room() {
      if (transport.writableLength <= TLS_WRITE_HIGH) return undefined;
      return new Promise<void>((resolve, reject) => {
        const done = (err?: Error) => {
          roomWaiter = null;
          transport.off("close", closed).off("error", done);
          if (err) reject(err);
          else resolve();
        };
        const closed = () => done(new Error("Connection closed"));
        roomWaiter = done;
        transport.on("close", closed).on("error", done);
      });
    },
    // The TLS socket's end() is done once TLS has the clear text, not once the
    // connection has the records: closing then would cut off the last replies
    // (Bun) or the last option reply (Deno, which never ends the transport).
    async sent() {
      if (!transport.writableEnded) transport.end();
      await finished(transport, { readable: false });
    },
  };
  return secureServer(transport, options, () => transport.destroy(), flow);
}

/** How {@linkcode startTlsOverStreams} bounds and ends the TLS socket over its transport. */
interface TransportFlow {
  /** The clear text's consumer has enough (true) or wants more (false): reading the transport waits. */
  hold(held: boolean): void;
  /** After a write of clear text: a promise while the transport holds too much ciphertext. */
  room(): Promise<void> | undefined;
  /** After the TLS socket's end(): settles once the connection has every record and is ended. */
  sent(): Promise<void>;
}

/** Ciphertext the transport may hold before writes of clear text wait, until it holds {@linkcode TLS_WRITE_LOW}. */
const TLS_WRITE_HIGH = 16 * 1024 * 1024;
const TLS_WRITE_LOW = 8 * 1024 * 1024;

function listenOn(
  server: net.Server,
  listen: (done: () => void) => void,
): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    listen(() => {
      server.off("error", reject);
      // Accept errors (EMFILE …) are emitted on the server; without a listener
      // they would kill the process. The server goes on listening.
      server.on("error", () => {});
      resolve();
    });
  });
}

/**
 * Remove `path` if it is a socket nobody listens on: a server that died left
 * it behind, and binding would fail with EADDRINUSE. A live socket is refused
 * ("PATH: Address already in use"); anything else at `path` is left alone
 * (binding then fails, as it should).
 *
 * @param path The Unix socket path about to be bound.
 */
export async function removeStaleSocket(path: string): Promise<void> {
  try {
    if (!(await fsp.lstat(path)).isSocket()) return;
  } catch {
    return; // nothing there
  }
  // A socket somebody still listens on is theirs: taking it over would
  // leave their clients connecting to us (the type's contract).
  const live = await new Promise<boolean>((resolve) => {
    const probe = net.createConnection({ path });
    probe.once("connect", () => {
      probe.destroy();
      resolve(true);
    });
    probe.once("error", () => resolve(false));
  });
  if (live) throw new Error(`${path}: Address already in use`);
  await fsp.unlink(path).catch(() => {});
}

function kindOf(st: fs.Stats): FileKind {
  if (st.isFile()) return "file";
  if (st.isDirectory()) return "directory";
  if (st.isFIFO()) return "fifo";
  if (st.isSocket()) return "socket";
  if (st.isCharacterDevice()) return "char";
  if (st.isBlockDevice()) return "block";
  return "other";
}

/**
 * Opens under way. Opening a FIFO waits for the other end in a libuv pool
 * thread, and Node's exit joins those threads: {@linkcode exitNow} plays the
 * other end first, or the process would never exit.
 */
const opening = new Set<{ path: string; flags: number }>();

/** Exit with `code`, even while a FIFO's open waits for its other end. */
function exitNow(code: number): never {
  const { O_RDONLY, O_WRONLY, O_RDWR, O_NONBLOCK } = fs.constants;
  for (const { path, flags } of opening) {
    try {
      if (!fs.statSync(path).isFIFO()) continue;
      const other = flags & (O_WRONLY | O_RDWR) ? O_RDONLY : O_WRONLY;
      fs.closeSync(fs.openSync(path, other | O_NONBLOCK));
    } catch {
      // Gone, or already open: nothing waits on it.
    }
  }
  return process.exit(code);
}

/** Promise wrappers over the fd-based callback API (no FileHandle objects). */
function openFd(path: string, flags: number, mode = 0o666): Promise<number> {
  const pending = { path, flags };
  opening.add(pending);
  return new Promise<number>((resolve, reject) => {
    fs.open(path, flags, mode, (err, fd) => err ? reject(err) : resolve(fd));
  }).finally(() => opening.delete(pending));
}

function fstatFd(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => {
    fs.fstat(fd, (err, st) => err ? reject(err) : resolve(st));
  });
}

function closeFd(fd: number): Promise<void> {
  return new Promise((resolve) => fs.close(fd, () => resolve()));
}

function readFd(fd: number, buf: Uint8Array): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.read(fd, buf, 0, buf.byteLength, null, (err, n) => err ? reject(err) : resolve(n));
  });
}

function writeFd(fd: number, buf: Uint8Array): Promise<number> {
  return new Promise((resolve, reject) => {
    fs.write(fd, buf, 0, buf.byteLength, null, (err, n) => err ? reject(err) : resolve(n));
  });
}

/**
 * A byte stream reading sequentially from `fd` with `read(2)` in the thread
 * pool; suitable for any kind of file. The fd is closed at the end.
 *
 * @param fd An fd open for reading, owned by the stream from now on.
 * @returns The readable stream.
 */
export function fdReadable(fd: number): ReadableStream<Uint8Array> {
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await closeFd(fd);
  };
  return new ReadableStream({
    type: "bytes",
    autoAllocateChunkSize: FILE_CHUNK,
    async pull(controller) {
      const request = controller.byobRequest!;
      const view = request.view!;
      let n: number;
      try {
        n = await readFd(fd, new Uint8Array(view.buffer, view.byteOffset, view.byteLength));
      } catch (err) {
        await close();
        throw err;
      }
      if (n === 0) {
        await close();
        controller.close();
        request.respond(0);
      } else {
        request.respond(n);
      }
    },
    cancel: close,
  });
}

/**
 * A writable stream writing sequentially to `fd` with `write(2)` in the thread
 * pool; suitable for any kind of file. The fd is closed when the stream is
 * closed or aborted.
 *
 * @param fd An fd open for writing, owned by the stream from now on.
 * @returns The writable stream.
 */
export function fdWritable(fd: number): WritableStream<Uint8Array> {
  let closed = false;
  const close = async () => {
    if (closed) return;
    closed = true;
    await closeFd(fd);
  };
  return new WritableStream<Uint8Array>({
    async write(chunk) {
      let done = 0;
      while (done < chunk.byteLength) done += await writeFd(fd, chunk.subarray(done));
    },
    close,
    abort: close,
  });
}

/**
 * Streams over a FIFO are served by the event loop (a libuv pipe handle, like
 * Node's own stdin) rather than the thread pool, where a read waiting for a
 * slow writer would hold one of its few threads. Other kinds use the pool.
 *
 * The socket reads into one buffer of the pipe's size (`onread`), copied out
 * straight into a BYOB reader's buffer when one waits: Node's own reads take
 * 64 KiB at a time, each a fresh buffer. 1 GiB from `cat` through the
 * streaming plugin's `read=FIFO` to `qemu-img convert -O qcow2`: 2.26–2.43 s
 * that way, 1.90–2.14 s this way (bench/streaming_read.sh).
 */
function pipeReadable(fd: number): ReadableStream<Uint8Array> {
  let push: ((bytes: Uint8Array<ArrayBuffer>, reused: boolean) => void) | undefined;
  // Node's Socket constructor takes `onread` as connect() does; its types list it for connect() only.
  const options: net.SocketConstructorOpts & {
    onread: {
      buffer: Uint8Array<ArrayBuffer>;
      callback(n: number, buf: Uint8Array<ArrayBuffer>): boolean;
    };
  } = {
    fd,
    readable: true,
    writable: false,
    onread: {
      buffer: new Uint8Array(PIPE_SIZE),
      callback(n, buf) {
        if (n > 0) push?.(buf.subarray(0, n), true);
        return true; // backpressure pauses the socket through pause()
      },
    },
  };
  const sock = new net.Socket(options);
  return nodeByteStream(sock, () => sock.destroy(), undefined, (p) => push = p);
}

function pipeWritable(fd: number): WritableStream<Uint8Array> {
  const sock = new net.Socket({ fd, readable: false, writable: true });
  return writableFromNode(sock, async () => {
    await endWritable(sock);
    sock.destroy();
  });
}

/**
 * The FIFO at `path`, open for writing as `fd`, as a paced stream
 * (runtime/paced_pipe.ts): a second, nonblocking descriptor written from
 * this thread while the reader is slow, `fd` itself written in the thread
 * pool while it is fast. Without `queued` from the FFI, `orElse(fd)`.
 *
 * @param path The FIFO.
 * @param fd A blocking descriptor open on it for writing (a reader is there).
 * @param libc The adapter's libc calls, if any.
 * @param orElse The stream to use when pacing is not possible.
 * @returns The stream; it closes both descriptors.
 */
export function pacedFifoWritable(
  path: string,
  fd: number,
  libc: PipeLibc | null,
  orElse: (fd: number) => WritableStream<Uint8Array>,
): WritableStream<Uint8Array> {
  const queued = libc?.queued;
  let fast: number;
  try {
    if (!libc || !queued) throw new Error("no FFI");
    fast = fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_NONBLOCK);
  } catch {
    return orElse(fd);
  }
  return pacedPipeWritable({
    tryWrite(buf) {
      try {
        return fs.writeSync(fast, buf);
      } catch (err) {
        const code = errnoCode(err);
        if (code === "EAGAIN") return -1;
        if (code === "EINTR") return 0;
        throw err;
      }
    },
    queued: () => queued(fast),
    async writeAll(buf) {
      for (let done = 0; done < buf.length;) done += await writeFd(fd, buf.subarray(done));
    },
    close() {
      fs.close(fast, () => {});
      fs.close(fd, () => {});
    },
  }, pipeCapacity(libc, fast));
}

/**
 * Open `path` (in the thread pool: opening a FIFO waits for its other end)
 * and stream it. Shared with the Bun adapter, which passes stream makers that
 * avoid `net.Socket` on pipes.
 *
 * @param path The file, FIFO or device.
 * @param flags `open(2)` flags.
 * @param forPipe Makes the stream when the fd turns out to be a FIFO.
 * @param forOther Makes the stream otherwise.
 * @returns The stream.
 */
export async function openStream<S>(
  path: string,
  flags: number,
  forPipe: (fd: number) => S,
  forOther: (fd: number) => S,
): Promise<S> {
  const fd = await openFd(path, flags);
  try {
    return (await fstatFd(fd)).isFIFO() ? forPipe(fd) : forOther(fd);
  } catch (err) {
    await closeFd(fd);
    throw err;
  }
}

/**
 * `stdinStream` and `stdoutStream` of the Node and Bun adapters, which enlarge
 * the pipes through their own FFI.
 *
 * @param libc The adapter's libc loader.
 * @returns The two methods.
 */
export function stdStreams(
  libc: () => Promise<PipeLibc | null>,
): Pick<Runtime, "stdinStream" | "stdoutStream"> {
  return {
    stdinStream() {
      libc().then((l) => enlargePipeFd(l, 0));
      const { stdin } = process;
      return readableFromNode(stdin, () => stdin.pause());
    },
    stdoutStream() {
      libc().then((l) => enlargePipeFd(l, 1));
      return writableFromNode(process.stdout);
    },
  };
}

let koffiLibc: Promise<PipeLibc | null> | undefined;

/**
 * libc's `fcntl` and `ioctl` through koffi (an optional dependency): what
 * {@linkcode enlargePipeFd} and {@linkcode pacedFifoWritable} need on Node,
 * which has neither. Without koffi, pipes keep their size and FIFO writes
 * are not paced.
 *
 * @returns The calls, or null.
 */
function nodePipeLibc(): Promise<PipeLibc | null> {
  return koffiLibc ??= (async () => {
    try {
      type Koffi = {
        load(path: string): { func(definition: string): (...a: unknown[]) => number };
      };
      const mod = await import("koffi") as unknown as { default?: Koffi } & Koffi;
      const lib = (mod.default ?? mod).load("libc.so.6");
      const fcntl = lib.func("int fcntl(int, int, ...)");
      const ioctl = lib.func("int ioctl(int, unsigned long, ...)");
      const count = new Int32Array(1);
      return {
        fcntl: (fd: number, cmd: number, arg: number) => fcntl(fd, cmd, "int", arg),
        queued: (fd: number) => ioctl(fd, FIONREAD, "int *", count) < 0 ? -1 : count[0],
      };
    } catch {
      return null;
    }
  })();
}

/**
 * The `open(2)` flags of {@linkcode Runtime.openWriteStream}: a regular file
 * is truncated, a missing one created, a FIFO or device opened as it is.
 *
 * @param path The path about to be opened for writing.
 * @returns The flags.
 */
export async function writeStreamFlags(path: string): Promise<number> {
  const { O_WRONLY, O_TRUNC, O_CREAT } = fs.constants;
  const info = await nodeRuntime.stat(path);
  if (info === null) return O_WRONLY | O_CREAT;
  return info.kind === "file" ? O_WRONLY | O_TRUNC : O_WRONLY;
}

/**
 * A file for random access, on a raw fd rather than a FileHandle: a
 * FileHandle that is garbage-collected unclosed is a fatal error on Bun, and
 * a plugin's error path must not be able to take the server down that way.
 * With libc's calls (koffi on Node, `bun:ffi` on Bun) it also punches holes,
 * zeroes ranges, finds holes and passes advice.
 */
class NodeFile implements RandomAccessFile {
  #fd: number;
  #calls: FileSyscalls | null;
  #cached: CachedReads | null = null;
  readonly kind: FileKind;
  fallocate?: FileExtras["fallocate"];
  seek?: FileExtras["seek"];
  advise?: FileExtras["advise"];

  constructor(fd: number, calls: FileSyscalls | null, kind: FileKind) {
    this.#fd = fd;
    this.#calls = calls;
    this.kind = kind;
    if (calls) Object.assign(this, fileExtras(calls, () => this.#fd));
    if (calls?.preadNowait) this.#cached = new CachedReads(calls.preadNowait);
  }

  // A read or write with a position is pread/pwrite: no shared file offset,
  // so concurrent requests need no lock. What the page cache holds of a
  // small read is taken on this thread first (see CachedReads).
  pread(buf: Uint8Array, offset: number): Promise<void> | undefined {
    const cached = this.#cached ? this.#cached.read(this.#fd, buf, offset) : 0;
    if (cached === buf.byteLength) return undefined;
    return this.#preadRest(buf, offset, cached);
  }

  async #preadRest(buf: Uint8Array, offset: number, cached: number): Promise<void> {
    let done = cached;
    while (done < buf.byteLength) {
      const n = await new Promise<number>((resolve, reject) => {
        fs.read(this.#fd, buf, done, buf.byteLength - done, offset + done, (err, n) => {
          if (err) reject(err);
          else resolve(n);
        });
      });
      if (n === 0) throw endOfFileError();
      done += n;
    }
  }

  async pwrite(buf: Uint8Array, offset: number): Promise<void> {
    let done = 0;
    while (done < buf.byteLength) {
      done += await new Promise<number>((resolve, reject) => {
        fs.write(this.#fd, buf, done, buf.byteLength - done, offset + done, (err, n) => {
          if (err) reject(err);
          else resolve(n);
        });
      });
    }
  }

  async size(): Promise<number> {
    const st = await fstatFd(this.#fd);
    if (this.kind !== "block") return st.size;
    // fstat says 0 for a block device: its end is where lseek finds it, or
    // without FFI what sysfs says, in 512-byte sectors.
    if (this.#calls) {
      const end = await this.#calls.lseek(this.#fd, 0, SEEK_END);
      if (end < 0) throw syscallError("lseek: SEEK_END", -end);
      return end;
    }
    return Number(await fsp.readFile(sysfsSizePath(st.rdev), "utf8")) * 512;
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => {
      fs.fdatasync(this.#fd, (err) => err ? reject(err) : resolve());
    });
  }

  close(): Promise<void> {
    const fd = this.#fd;
    this.#fd = -1;
    return new Promise((resolve, reject) => {
      fs.close(fd, (err) => err ? reject(err) : resolve());
    });
  }
}

/**
 * Open `path` for random access on a raw descriptor, with the calls no
 * runtime exposes made through `syscalls` (the adapter's FFI; none: the file
 * has no `fallocate`, `seek` or `advise`).
 *
 * @param path The file or block device.
 * @param write Whether writes are allowed.
 * @param syscalls The adapter's FFI calls, or null.
 * @returns The file.
 */
export async function openNodeFile(
  path: string,
  write: boolean,
  syscalls: () => Promise<FileSyscalls | null>,
): Promise<RandomAccessFile> {
  const { O_RDONLY, O_RDWR, O_NONBLOCK } = fs.constants;
  // Nonblocking: a FIFO at the path (put there after the caller looked)
  // would hold a pool thread until a writer came. Files and block devices
  // ignore the flag.
  const fd = await openFd(path, (write ? O_RDWR : O_RDONLY) | O_NONBLOCK);
  try {
    const kind = kindOf(await fstatFd(fd));
    refuseUnseekable(path, kind);
    return new NodeFile(fd, await syscalls(), kind);
  } catch (err) {
    await closeFd(fd);
    throw err;
  }
}

let sleepCell: Int32Array | undefined;

/** Block the thread for `ms` milliseconds (only used to wait out EAGAIN). */
function sleepSync(ms: number): void {
  try {
    sleepCell ??= new Int32Array(new SharedArrayBuffer(4));
    Atomics.wait(sleepCell, 0, 0, ms);
  } catch {
    // Atomics.wait refused on this thread: retrying at once still works.
  }
}

/**
 * Write all of `text` to `fd` synchronously. A non-blocking fd (stderr shared
 * with a process that set O_NONBLOCK) answers EAGAIN when full: wait and retry
 * rather than lose a log line. Other errors mean nobody is listening.
 */
function writeAllSync(fd: number, text: string | Uint8Array): void {
  const bytes = typeof text === "string" ? encoder.encode(text) : text;
  let done = 0;
  while (done < bytes.length) {
    try {
      done += fs.writeSync(fd, bytes, done, bytes.length - done);
    } catch (err) {
      if (errnoCode(err) !== "EAGAIN") return;
      sleepSync(1);
    }
  }
}

/**
 * Read `out` until its first newline; resolves with the text before it (or
 * everything, if it ends first). Reading stops there without closing the pipe.
 */
function firstLineOf(out: Readable): Promise<string> {
  return new Promise((resolve, reject) => {
    const decoder = new TextDecoder();
    let text = "";
    const finish = () => {
      out.off("data", onData);
      out.off("end", finish);
      out.off("error", onError);
      out.pause();
      const nl = text.indexOf("\n");
      resolve(nl >= 0 ? text.slice(0, nl) : text);
    };
    const onData = (chunk: Uint8Array) => {
      text += decoder.decode(chunk, { stream: true });
      if (text.includes("\n")) finish();
    };
    const onError = (err: Error) => {
      out.off("data", onData);
      out.off("end", finish);
      reject(err);
    };
    out.on("data", onData);
    out.on("end", finish);
    out.on("error", onError);
  });
}

function exitStatus(code: number | null, signal: NodeJS.Signals | null): ExitStatus {
  if (signal) return { code: null, signal: os.constants.signals[signal] ?? 0 };
  return { code: code ?? 0, signal: null };
}

/** The runtime adapter for Node (also the base of the Bun adapter). */
export const nodeRuntime: Runtime = {
  name: "node",
  version: process.versions.node,
  args: process.argv.slice(2),
  pid: process.pid,
  ppid: () => process.ppid,
  env: (name) => process.env[name],
  exit: exitNow,
  writeStderr: (text) => writeAllSync(2, text),
  writeStdout: (text) => writeAllSync(1, text),
  // Not process.stderr.isTTY: creating process.stderr makes a piped stderr nonblocking.
  stderrIsTerminal: () => tty.isatty(2),
  onSignal(signal: SignalName, handler: () => void) {
    process.on(signal, handler);
  },
  endOnSigusr1() {
    // A listener replaces Node's own, which would start the inspector. The
    // status is a shell's for a process killed by SIGUSR1.
    process.on("SIGUSR1", () => exitNow(128 + 10));
  },

  async listenTcp(hostname, port, onConnection, options): Promise<Listener> {
    const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (sock) => {
      sock.setNoDelay(true);
      onConnection(socketConnection(sock));
    });
    const ipv6Only = options?.ipv6Only ?? false;
    await listenOn(server, (done) => server.listen({ host: hostname, port, ipv6Only }, done));
    const addr = server.address() as net.AddressInfo;
    return {
      address: { transport: "tcp", hostname: addr.address, port: addr.port },
      close: () => server.close(),
    };
  },

  async listenUnix(path, onConnection): Promise<Listener> {
    await removeStaleSocket(path);
    const server = net.createServer({ allowHalfOpen: true }, (sock) => {
      onConnection(socketConnection(sock));
    });
    try {
      await listenOn(server, (done) => server.listen({ path }, done));
    } catch (err) {
      // libuv reports a missing directory as EACCES (as on Windows).
      if (errnoCode(err) === "EACCES" && !fs.existsSync(dirname(path))) {
        throw Object.assign(new Error("ENOENT: no such file or directory"), { code: "ENOENT" });
      }
      throw err;
    }
    return { address: { transport: "unix", path }, close: () => server.close() };
  },

  async lookup(hostname, family) {
    try {
      const found = await dns.lookup(hostname, { all: true, family });
      return found.map((a) => a.address);
    } catch (err) {
      // getaddrinfo's own words, as nbdkit prints them, not "getaddrinfo ENOTFOUND host".
      const code = errnoCode(err);
      throw Object.assign(
        new Error(
          code === "ENOTFOUND"
            ? "Name or service not known"
            : code === "EAI_AGAIN"
            ? "Temporary failure in name resolution"
            : String((err as Error).message),
        ),
        { code },
      );
    }
  },

  async listenFd(fd, onConnection): Promise<Listener> {
    const server = net.createServer({ allowHalfOpen: true, noDelay: true }, (sock) => {
      onConnection(socketConnection(sock));
    });
    await listenOn(server, (done) => server.listen({ fd }, done));
    return { address: { transport: "inherited", fd }, close: () => server.close() };
  },

  connectUnix(path): Promise<Connection> {
    return new Promise((resolve, reject) => {
      const sock = net.createConnection({ path, allowHalfOpen: true });
      sock.once("error", reject);
      sock.once("connect", () => {
        sock.off("error", reject);
        resolve(socketConnection(sock));
      });
    });
  },

  stdio(): Connection {
    const { stdin, stdout } = process;
    return {
      readable: readableFromNode(stdin, () => stdin.pause()),
      writable: writableFromNode(stdout),
      close() {
        stdin.destroy();
        destroyNow(stdout);
      },
      startTls(options) {
        return startTlsOverStreams(this, options);
      },
    };
  },

  spawnShell(command: string, options: SpawnOptions = {}): ShellChild {
    const child = spawn("/bin/sh", ["-c", command], {
      env: { ...process.env, ...options.env },
      // Our fd 2 given as the child's stdout: no pipe to pump.
      stdio: [
        options.stdin === "null" ? "ignore" : "inherit",
        options.stdout === "stderr" ? 2 : "inherit",
        "inherit",
      ],
    });
    let ended = false;
    const status = new Promise<ExitStatus>((resolve, reject) => {
      child.once("error", reject);
      child.once("exit", (code, signal) => {
        ended = true;
        resolve(exitStatus(code, signal));
      });
    });
    return {
      status,
      kill(signal) {
        if (!ended) child.kill(signal);
      },
    };
  },

  async spawnDetachedSelf(args, env, keepStderr = false) {
    // detached: the child leads a new session (setsid(2)), as nbdkit's fork does.
    const [program, ...rest] = nodeRuntime.selfCommand();
    const child = spawn(program, [...rest, ...args], {
      env: { ...process.env, ...env },
      stdio: ["ignore", "pipe", keepStderr ? "inherit" : "pipe"],
      detached: true,
    });
    const failed = new Promise<never>((_, reject) => child.once("error", reject));
    failed.catch(() => {});
    const out = child.stdout!;
    const err = child.stderr;
    // Until the child is ready its messages are ours; after that its stderr
    // must not hold open the stderr of whoever waits on us.
    const relay = (chunk: Buffer) => writeAllSync(2, chunk);
    err?.on("data", relay);
    try {
      return await Promise.race([firstLineOf(out), failed]);
    } finally {
      err?.off("data", relay);
      // The parent is about to exit: neither the child nor its pipes may keep
      // the event loop alive.
      for (const pipe of [out, err]) (pipe as Readable & { unref?: () => void } | null)?.unref?.();
      child.unref();
    }
  },

  selfCommand() {
    const script = process.argv[1];
    // A `bun build --compile` binary runs its entry point from an embedded
    // file system; the binary alone restarts it.
    if (!script || script.startsWith("/$bunfs/")) {
      return [process.execPath];
    }
    return [process.execPath, ...process.execArgv, script];
  },

  async stat(path): Promise<FileInfo | null> {
    try {
      const st = await fsp.stat(path);
      return { kind: kindOf(st), size: st.size };
    } catch (err) {
      if (errnoCode(err) === "ENOENT") return null;
      throw err;
    }
  },

  readDir: (path) => fsp.readdir(path),

  openFile: (path, { write }) => openNodeFile(path, write, koffiFileSyscalls),

  async mkfifo(path) {
    const child = spawn("mkfifo", ["-m", "600", "--", path], {
      stdio: ["ignore", "ignore", "pipe"],
    });
    let stderr = "";
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (text: string) => stderr += text);
    const status = await new Promise<ExitStatus>((resolve, reject) => {
      child.once("error", reject);
      child.once("close", (code, signal) => resolve(exitStatus(code, signal)));
    });
    if (status.code !== 0) {
      const how = status.signal === null ? `exit status ${status.code}` : `signal ${status.signal}`;
      throw new Error(`mkfifo: ${stderr.trim() || how}`);
    }
  },

  async openReadStream(path) {
    const libc = await nodePipeLibc();
    return openStream(path, fs.constants.O_RDONLY, (fd) => {
      enlargePipeFd(libc, fd);
      return pipeReadable(fd);
    }, fdReadable);
  },

  async openWriteStream(path) {
    const libc = await nodePipeLibc();
    return openStream(path, await writeStreamFlags(path), (fd) => {
      enlargePipeFd(libc, fd);
      return pacedFifoWritable(path, fd, libc, pipeWritable);
    }, fdWritable);
  },

  ...stdStreams(nodePipeLibc),
  writeTextFile: (path, text) => fsp.writeFile(path, text),
  async removeFile(path) {
    try {
      await fsp.unlink(path);
    } catch (err) {
      if (errnoCode(err) !== "ENOENT") throw err;
    }
  },
  prepareTls: (options) => new Promise((resolve) => resolve(prepareNodeTls(options))),
  uid: () => process.getuid?.() ?? 0,
  makeTempDir: (prefix) => fsp.mkdtemp(join(os.tmpdir(), prefix)),
  removeDir: (dir) => fsp.rm(dir, { recursive: true }),
  resolvePath: (path) => resolve(path),
  async importModule(path) {
    if (/\.m?ts$/.test(path) && !process.versions.bun) registerTypeScriptHooks();
    return await import(pathToFileURL(resolve(path)).href);
  },
};

/**
 * The Bun adapter: the Node adapter (Bun implements the `node:` modules), with
 * sockets on `Bun.listen`/`Bun.connect`, which skip the Node stream layer that
 * Bun's `node:net` adds on top of them, and FIFOs on the thread pool, because
 * Bun's `net.Socket` cannot wrap a FIFO's fd (it hangs).
 *
 * @module
 */
import type { Connection, Listener, Runtime, TlsServerOptions } from "./types.ts";
import {
  fdReadable,
  fdWritable,
  nodeRuntime,
  openNodeFile,
  openStream,
  pacedFifoWritable,
  READ_HIGH_WATER_MARK,
  removeStaleSocket,
  startTlsOverStreams,
  stdStreams,
  writeStreamFlags,
} from "./node.ts";
import { constants } from "node:fs";
import process from "node:process";
import { enlargePipeFd, type PipeLibc } from "./pipe_size.ts";
import { type BunPointer, importBunFfi } from "./libvirt/bun_ffi.ts";
import { FIONREAD } from "./paced_pipe.ts";
import { bunFileSyscalls } from "./node_file_syscalls.ts";

let bunLibc: Promise<PipeLibc | null> | undefined;

/** The libc calls as `bun:ffi` types them. */
interface BunLibc {
  fcntl(fd: number, cmd: number, arg: number): number;
  ioctl(fd: number, request: number, out: BunPointer): number;
}

/** libc's `fcntl` and `ioctl` through `bun:ffi`, for {@linkcode enlargePipeFd} and pacing FIFO writes. */
function bunPipeLibc(): Promise<PipeLibc | null> {
  return bunLibc ??= (async () => {
    try {
      const ffi = await importBunFfi();
      const { symbols } = ffi.dlopen<BunLibc>("libc.so.6", {
        fcntl: { args: ["i32", "i32", "i32"], returns: "i32" },
        ioctl: { args: ["i32", "u64", "ptr"], returns: "i32" },
      });
      const count = new Int32Array(1);
      const at = ffi.ptr(count);
      return {
        fcntl: symbols.fcntl,
        queued: (fd: number) => symbols.ioctl(fd, FIONREAD, at) < 0 ? -1 : count[0],
      };
    } catch {
      return null;
    }
  })();
}

/** `make`, enlarging the pipe of the fd it is given first. */
async function enlarging<S>(make: (fd: number) => S): Promise<(fd: number) => S> {
  const libc = await bunPipeLibc();
  return (fd) => {
    enlargePipeFd(libc, fd);
    return make(fd);
  };
}

/**
 * The part of Bun's socket API used here, declared locally (checked against
 * `bun-types`) so that this file type-checks under Deno and tsc without Bun's
 * global types.
 */
interface Socket {
  data: BunConnection | undefined;
  write(data: Uint8Array, byteOffset?: number, byteLength?: number): number;
  end(): void;
  shutdown(halfClose?: boolean): void;
  pause(): void;
  resume(): void;
  setNoDelay(noDelay?: boolean): boolean;
}

interface SocketHandler {
  binaryType: "uint8array";
  open(socket: Socket): void;
  data(socket: Socket, chunk: Uint8Array): void;
  drain(socket: Socket): void;
  end(socket: Socket): void;
  close(socket: Socket, err?: Error): void;
  error(socket: Socket, err: Error): void;
}

interface SocketListener {
  readonly hostname: string;
  readonly port: number;
  stop(closeActiveConnections?: boolean): void;
}

type SocketOptions =
  & { allowHalfOpen?: boolean; socket: SocketHandler }
  & ({ hostname: string; port: number; ipv6Only?: boolean } | { unix: string });

declare const Bun: {
  readonly version: string;
  listen(options: SocketOptions): SocketListener;
  connect(options: SocketOptions): Promise<Socket>;
};

/** Writes up to this size are copied into the batch; bigger ones go out as they are. */
const SMALL_WRITE = 64 << 10;
/** A batch the kernel will not take beyond this size holds up the writer. */
const BATCH_LIMIT = 1 << 20;

/**
 * One socket as a {@linkcode Connection}. Bun calls one set of handlers for
 * every socket of a listener; each socket's `data` points at its instance.
 *
 * Writing: Bun's `socket.write()` is unbuffered — it returns how much the
 * kernel took (maybe less than given; -1 once closed) and calls `drain` when
 * more fits. One `send(2)` per reply cost three quarters of small-request
 * throughput in our in-process benchmark, so small writes are copied into a batch
 * that goes out in one call on the next tick; a write resolves once its bytes
 * are copied or in the kernel, so the caller may reuse its buffer at once.
 */
class BunConnection implements Connection {
  readonly readable: ReadableStream<Uint8Array>;
  readonly writable: WritableStream<Uint8Array>;
  #socket: Socket;
  #controller!: ReadableByteStreamController;
  #done = false;
  #paused = false;
  #closed: Error | null = null;
  #batch = new Uint8Array(SMALL_WRITE);
  #batchLength = 0;
  #flushScheduled = false;
  /** The kernel refused bytes: nothing more is sent before `drain`. */
  #blocked = false;
  #drained: (() => void) | null = null;

  constructor(socket: Socket) {
    this.#socket = socket;
    this.readable = new ReadableStream({
      type: "bytes",
      start: (controller) => {
        this.#controller = controller;
      },
      pull: () => {
        if (this.#paused && !this.#done) {
          this.#paused = false;
          this.#socket.resume();
        }
      },
      cancel: () => {
        // Only the reading half: replies may still be written.
        this.#done = true;
        this.#socket.pause();
      },
    }, { highWaterMark: READ_HIGH_WATER_MARK });
    this.writable = new WritableStream<Uint8Array>({
      write: (chunk) => this.#write(chunk),
      close: async () => {
        await this.#flushAll();
        // FIN, keeping the reading half open (end() would close both).
        this.#socket.shutdown();
      },
      abort: () => this.close(),
    });
  }

  onData(chunk: Uint8Array): void {
    if (this.#done) return;
    // Bun hands each callback a fresh buffer: it can be enqueued as it is.
    this.#controller.enqueue(chunk as Uint8Array<ArrayBuffer>);
    if (!this.#paused && (this.#controller.desiredSize ?? 0) <= 0) {
      this.#paused = true;
      this.#socket.pause();
    }
  }

  onDrain(): void {
    this.#blocked = false;
    if (this.#flush()) this.#wake();
  }

  /** The peer finished sending: reading ends, writing goes on. */
  onEnd(): void {
    this.#finish();
  }

  /** The socket is gone (closed, reset): reading ends or errors, writes fail. */
  onClose(err?: Error): void {
    this.#closed ??= err ?? new Error("Connection closed");
    this.#wake();
    this.#finish(err);
  }

  /** TLS through Bun's `node:tls` over this connection's streams. */
  startTls(options: TlsServerOptions): Promise<Connection> {
    return startTlsOverStreams(this, options);
  }

  close(): void {
    // Replies already resolved for may still sit in the batch.
    if (!this.#closed) this.#flush();
    this.#socket.end();
    this.onClose();
  }

  #finish(err?: Error): void {
    if (this.#done) return;
    this.#done = true;
    if (err) {
      this.#controller.error(err);
    } else {
      this.#controller.close();
      // A BYOB read waiting for bytes must be told there are none.
      this.#controller.byobRequest?.respond(0);
    }
  }

  #wake(): void {
    const wake = this.#drained;
    this.#drained = null;
    wake?.();
  }

  /** Resolves on the next `drain` that empties the batch, or on close. */
  #drain(): Promise<void> {
    return new Promise((resolve) => this.#drained = resolve);
  }

  #write(chunk: Uint8Array): void | Promise<void> {
    if (this.#closed) throw this.#closed;
    if (chunk.byteLength > SMALL_WRITE) return this.#writeLarge(chunk);
    this.#append(chunk);
    if (this.#batchLength >= BATCH_LIMIT) return this.#flushAll();
    if (!this.#flushScheduled) {
      this.#flushScheduled = true;
      process.nextTick(this.#flushTick);
    }
  }

  #flushTick = (): void => {
    this.#flushScheduled = false;
    if (!this.#closed) this.#flush();
  };

  #append(chunk: Uint8Array): void {
    const need = this.#batchLength + chunk.byteLength;
    if (need > this.#batch.byteLength) {
      const bigger = new Uint8Array(Math.max(need, this.#batch.byteLength * 2));
      bigger.set(this.#batch.subarray(0, this.#batchLength));
      this.#batch = bigger;
    }
    this.#batch.set(chunk, this.#batchLength);
    this.#batchLength = need;
  }

  /** Give the batch to the kernel; true when it is empty afterwards. */
  #flush(): boolean {
    if (this.#blocked) return false;
    const length = this.#batchLength;
    if (length === 0) return true;
    const n = this.#socket.write(this.#batch, 0, length);
    if (n < 0) {
      this.#closed ??= new Error("Connection closed");
      return false;
    }
    if (n < length) {
      this.#batch.copyWithin(0, n, length);
      this.#batchLength = length - n;
      this.#blocked = true;
      return false;
    }
    this.#batchLength = 0;
    // A burst may have grown the batch: do not keep megabytes per idle connection.
    if (this.#batch.byteLength > SMALL_WRITE) this.#batch = new Uint8Array(SMALL_WRITE);
    return true;
  }

  async #flushAll(): Promise<void> {
    while (!this.#flush()) {
      if (this.#closed) throw this.#closed;
      await this.#drain();
    }
  }

  async #writeLarge(chunk: Uint8Array): Promise<void> {
    await this.#flushAll();
    let rest = chunk;
    while (true) {
      const n = this.#socket.write(rest);
      if (n < 0) throw this.#closed ?? new Error("Connection closed");
      rest = rest.subarray(n);
      if (rest.byteLength === 0) return;
      this.#blocked = true;
      await this.#drain();
      if (this.#closed) throw this.#closed;
    }
  }
}

function handlers(
  onOpen: (conn: BunConnection) => void,
  tcp: boolean,
): SocketHandler {
  return {
    binaryType: "uint8array",
    open(socket) {
      if (tcp) socket.setNoDelay(true);
      socket.data = new BunConnection(socket);
      onOpen(socket.data);
    },
    data: (socket, chunk) => socket.data?.onData(chunk),
    drain: (socket) => socket.data?.onDrain(),
    end: (socket) => socket.data?.onEnd(),
    close: (socket, err) => socket.data?.onClose(err),
    // Called when one of these handlers throws: end this socket, not the process.
    error(socket, err) {
      socket.data?.onClose(err);
      socket.end();
    },
  };
}

function listener(l: SocketListener, address: Listener["address"]): Listener {
  // stop(false): already accepted connections carry on.
  return { address, close: () => l.stop(false) };
}

/** The runtime adapter for Bun. */
export const bunRuntime: Runtime = {
  ...nodeRuntime,

  // Node's files, with fallocate, SEEK_HOLE and fadvise through bun:ffi (not koffi).
  openFile: (path, { write }) => openNodeFile(path, write, bunFileSyscalls),
  name: "bun",
  version: Bun.version,

  listenTcp(hostname, port, onConnection, options): Promise<Listener> {
    // The executor turns Bun.listen's synchronous throw (EADDRINUSE …) into a rejection.
    return new Promise((resolve) => {
      const l = Bun.listen({
        hostname,
        port,
        ipv6Only: options?.ipv6Only ?? false,
        allowHalfOpen: true,
        socket: handlers(onConnection, true),
      });
      resolve(listener(l, { transport: "tcp", hostname: l.hostname, port: l.port }));
    });
  },

  async listenUnix(path, onConnection): Promise<Listener> {
    await removeStaleSocket(path);
    const l = Bun.listen({
      unix: path,
      allowHalfOpen: true,
      socket: handlers(onConnection, false),
    });
    return listener(l, { transport: "unix", path });
  },

  async connectUnix(path): Promise<Connection> {
    const socket = await Bun.connect({
      unix: path,
      allowHalfOpen: true,
      socket: handlers(() => {}, false),
    });
    return socket.data!;
  },

  prepareTls(options) {
    if (options.psk) {
      // Bun's node:tls ignores pskCallback (BoringSSL finds no shared cipher).
      return Promise.reject(
        new Error(
          "TLS pre-shared keys (--tls-psk) are not available on Bun, whose TLS has no PSK: " +
            "run nbdkit-ts on Node (npx nbdkit-ts)",
        ),
      );
    }
    return nodeRuntime.prepareTls(options);
  },

  async openReadStream(path) {
    return openStream(path, constants.O_RDONLY, await enlarging(fdReadable), fdReadable);
  },

  async openWriteStream(path) {
    const flags = await writeStreamFlags(path);
    const libc = await bunPipeLibc();
    return openStream(path, flags, (fd) => {
      enlargePipeFd(libc, fd);
      return pacedFifoWritable(path, fd, libc, fdWritable);
    }, fdWritable);
  },

  ...stdStreams(bunPipeLibc),
};

/**
 * The Deno adapter.
 *
 * @module
 */
import type {
  Connection,
  ExitStatus,
  FileInfo,
  Listener,
  Runtime,
  ShellChild,
  SignalName,
  SpawnOptions,
  TlsServerOptions,
} from "./types.ts";
import { readFirstLine } from "./first_line.ts";
import { enlargePipeFd, pipeCapacity } from "./pipe_size.ts";
import { FIONREAD, pacedPipeWritable, writeOutcome } from "./paced_pipe.ts";
import { denoLibc, errnoReader, O_CLOEXEC, O_NONBLOCK, O_RDONLY, O_WRONLY } from "./deno_libc.ts";
import { cString } from "./c_string.ts";
import { kindOf, openDenoFile } from "./deno_file.ts";
import { listenV6Only } from "./deno_v6only.ts";

const encoder = new TextEncoder();

function writeAllSync(w: { writeSync(p: Uint8Array): number }, text: string): void {
  let bytes = encoder.encode(text);
  while (bytes.length > 0) {
    try {
      bytes = bytes.subarray(w.writeSync(bytes));
    } catch {
      return; // stderr closed: nowhere to report it
    }
  }
}

/**
 * Enlarge the pipe of the FIFO at `path`, whose `write` end (or read end) we
 * hold through a Deno file, which does not expose its descriptor: a second,
 * nonblocking open of the same end succeeds at once, and the size belongs to
 * the pipe, whichever descriptor sets it.
 */
function enlargeFifo(path: string, write: boolean): void {
  const libc = denoLibc();
  if (!libc) return;
  const fd = libc.open(cString(path), (write ? O_WRONLY : O_RDONLY) | O_NONBLOCK | O_CLOEXEC, 0);
  if (fd < 0) return;
  enlargePipeFd(libc, fd);
  libc.close(fd);
}

/**
 * The FIFO at `path`, already open for writing as `file`, as a paced
 * nonblocking stream (runtime/paced_pipe.ts); null without libc, and the
 * caller keeps Deno's own writer, which waits in `write(2)` on its threads.
 */
function pacedFifo(path: string, file: Deno.FsFile): WritableStream<Uint8Array> | null {
  const libc = denoLibc();
  if (!libc) return null;
  // A reader is there (Deno's open returned), so this open succeeds at once.
  const fd = libc.open(cString(path), O_WRONLY | O_NONBLOCK | O_CLOEXEC, 0);
  if (fd < 0) return null;
  enlargePipeFd(libc, fd);
  const errno = errnoReader(libc);
  const count = new Int32Array(1);
  return pacedPipeWritable({
    tryWrite: (buf) => writeOutcome(Number(libc.write(fd, buf, BigInt(buf.length))), errno),
    queued: () => libc.ioctl(fd, BigInt(FIONREAD), count) < 0 ? -1 : count[0],
    async writeAll(buf) {
      for (let done = 0; done < buf.length;) done += await file.write(buf.subarray(done));
    },
    close() {
      libc.close(fd);
      try {
        file.close();
      } catch {
        // already closed by a failed write
      }
    },
  }, pipeCapacity(libc, fd));
}

/** Chunk size of socket reads: a whole 64 KiB NBD write arrives in one or two. */
const READ_CHUNK = 64 * 1024;

const SIGUSR1 = 10; // on Linux

/**
 * The most a read into a small buffer (the request reader's) asks for.
 * Deno's sockets are tokio's, which take a read that returns less than it
 * asked for as proof that the socket is empty: the next read then waits for
 * the event loop's next poll (`epoll_wait`), even when more has arrived
 * meanwhile. Asking for less than a burst of requests usually holds makes
 * most reads come back full, so the next one is served at once. fio, 4 KiB
 * random writes QD16, interleaved rounds on one machine: 145 000–163 000
 * IOPS asking for 64 KiB, 181 000–205 000 asking for 32 KiB (epoll_wait calls
 * 20 000 → 6 000 a second, context switches halved); 24 and 48 KiB were
 * slower; with 64 requests in flight, where bursts are deeper, about 10%
 * slower than 64 KiB, and with 4 connections of QD16 the same. Larger reads
 * (payloads read straight into their buffers) ask for all they need.
 */
const SMALL_READ_MAX = 32 * 1024;

/**
 * The connection's bytes as a stream. Not `conn.readable`, which closes the
 * whole connection at end of input: a client that half-closes after its last
 * request must still get the replies.
 */
function readableOf(conn: Deno.Conn): ReadableStream<Uint8Array> {
  // One read buffer, reused while reads are small (a burst of 28-byte request
  // headers must not cost a fresh 64 KiB buffer each); a large read gives its
  // buffer away as the chunk, saving a copy of write payloads. A BYOB reader
  // gets the bytes straight into its own buffer.
  let buf = new Uint8Array(READ_CHUNK);
  return new ReadableStream({
    type: "bytes",
    async pull(controller) {
      const request = controller.byobRequest;
      const view = request?.view;
      const target = view ? new Uint8Array(view.buffer, view.byteOffset, view.byteLength) : buf;
      let n: number | null;
      const capped = target.length > SMALL_READ_MAX && target.length <= READ_CHUNK;
      try {
        n = await conn.read(capped ? target.subarray(0, SMALL_READ_MAX) : target);
      } catch (err) {
        try {
          controller.error(err);
        } catch { /* cancelled meanwhile */ }
        return;
      }
      try {
        if (n === null) {
          controller.close();
          request?.respond(0);
        } else if (request) {
          request.respond(n);
        } else if (n < READ_CHUNK / 4) {
          controller.enqueue(buf.slice(0, n));
        } else {
          controller.enqueue(buf.subarray(0, n)); // transfers buf's memory
          buf = new Uint8Array(READ_CHUNK);
        }
      } catch { /* cancelled meanwhile */ }
    },
  });
}

function wrapConn(conn: Deno.Conn): Connection {
  return {
    readable: readableOf(conn),
    writable: conn.writable,
    close() {
      try {
        conn.close();
      } catch {
        // already closed
      }
    },
    startTls(options) {
      return startTls(this, options);
    },
  };
}

/**
 * TLS for a connection. `Deno.startTls` is client-only and `Deno.listenTls`
 * cannot upgrade an accepted connection, but Deno's `node:tls` runs a server
 * handshake over any stream: the Node adapter's code does it over ours
 * (loaded only when TLS is used).
 */
async function startTls(conn: Connection, options: TlsServerOptions): Promise<Connection> {
  return await (await import("./node.ts")).startTlsOverStreams(conn, options);
}

async function acceptLoop(
  listener: Deno.Listener,
  onConnection: (conn: Connection) => void,
  tcp: boolean,
): Promise<void> {
  while (true) {
    let conn: Deno.Conn;
    try {
      conn = await listener.accept();
    } catch (err) {
      if (err instanceof Deno.errors.BadResource || err instanceof Deno.errors.Interrupted) return;
      // EMFILE and friends: wait and carry on rather than stop serving.
      await new Promise((r) => setTimeout(r, 100));
      continue;
    }
    if (tcp) {
      try {
        (conn as Deno.TcpConn).setNoDelay(true);
      } catch {
        // not fatal
      }
    }
    onConnection(wrapConn(conn));
  }
}

/** Remove a socket file nobody listens on; refuse one that is in use, as bind would. */
async function removeStaleSocket(path: string): Promise<void> {
  let info: Deno.FileInfo;
  try {
    info = await Deno.lstat(path);
  } catch {
    return;
  }
  if (!info.isSocket) return; // bind reports "Address already in use" itself
  try {
    (await Deno.connect({ transport: "unix", path })).close();
  } catch {
    await Deno.remove(path);
    return;
  }
  throw new Error(`${path}: Address already in use`);
}

function mainScript(): string | undefined {
  const main = Deno.mainModule;
  return main.startsWith("file:") ? new URL(main).pathname : undefined;
}

/** The runtime adapter for Deno. */
export const denoRuntime: Runtime = {
  name: "deno",
  version: Deno.version.deno,
  args: Deno.args,
  pid: Deno.pid,
  ppid: () => Deno.ppid,
  env: (name) => Deno.env.get(name),
  exit: (code) => Deno.exit(code),
  writeStderr: (text) => writeAllSync(Deno.stderr, text),
  writeStdout: (text) => writeAllSync(Deno.stdout, text),
  stderrIsTerminal: () => Deno.stderr.isTerminal(),
  onSignal(signal: SignalName, handler: () => void) {
    Deno.addSignalListener(signal, handler);
  },
  endOnSigusr1() {
    // Deno installs its SIGUSR1 handler (which starts the inspector) half a
    // second after start-up, and a listener of ours runs beside it, not
    // instead: so the signal's disposition is set back to the default
    // (terminate) once that handler is in, and again a little later. Without
    // FFI allowed (no libc), Deno's behaviour stays.
    //
    // Nothing is done sooner: a reset now would be undone by that handler,
    // and loading libc and Deno's timers module (its first setTimeout) would
    // cost every start-up about 10 ms. AbortSignal.timeout's timers need no
    // such module; that they hold the event loop does not matter, since the
    // command line ends with an explicit exit.
    const reset = () => denoLibc()?.signal(SIGUSR1, 0n); // SIG_DFL
    for (const ms of [600, 1500, 3000]) AbortSignal.timeout(ms).onabort = reset;
  },

  async lookup(hostname, family) {
    const { nodeRuntime } = await import("./node.ts");
    return await nodeRuntime.lookup(hostname, family);
  },

  listenTcp(hostname, port, onConnection, options): Promise<Listener> {
    if (options?.ipv6Only && hostname === "::") return listenV6Only(port, onConnection);
    const listener = Deno.listen({ hostname, port, transport: "tcp" });
    const addr = listener.addr as Deno.NetAddr;
    acceptLoop(listener, onConnection, true);
    return Promise.resolve({
      address: { transport: "tcp", hostname: addr.hostname, port: addr.port },
      close: () => listener.close(),
    });
  },

  async listenUnix(path, onConnection): Promise<Listener> {
    await removeStaleSocket(path);
    const listener = Deno.listen({ transport: "unix", path });
    acceptLoop(listener, onConnection, false);
    return { address: { transport: "unix", path }, close: () => listener.close() };
  },

  async listenFd(fd, onConnection) {
    // Deno.listen cannot adopt a descriptor; Deno's node:net can, and the Node
    // adapter's sockets are connections already. Loaded only when needed.
    const { nodeRuntime } = await import("./node.ts");
    return await nodeRuntime.listenFd(fd, onConnection);
  },

  async connectUnix(path) {
    return wrapConn(await Deno.connect({ transport: "unix", path }));
  },

  stdio(): Connection {
    return {
      readable: Deno.stdin.readable,
      writable: Deno.stdout.writable,
      close() {
        try {
          Deno.stdin.close();
        } catch { /* closed */ }
        try {
          Deno.stdout.close();
        } catch { /* closed */ }
      },
      startTls(options) {
        return startTls(this, options);
      },
    };
  },

  spawnShell(command: string, options: SpawnOptions = {}): ShellChild {
    const child = new Deno.Command("/bin/sh", {
      args: ["-c", command],
      env: options.env,
      stdin: options.stdin === "null" ? "null" : "inherit",
      stdout: options.stdout === "stderr" ? "piped" : "inherit",
      stderr: "inherit",
    }).spawn();
    if (options.stdout === "stderr") {
      child.stdout.pipeTo(Deno.stderr.writable, { preventClose: true });
    }
    let ended = false;
    const status = child.status.then((s: Deno.CommandStatus): ExitStatus => {
      ended = true;
      return s.signal
        ? { code: null, signal: signalNumber(s.signal) }
        : { code: s.code, signal: null };
    });
    return {
      status,
      kill(signal) {
        if (ended) return;
        try {
          child.kill(signal);
        } catch {
          // it ended meanwhile
        }
      },
    };
  },

  async spawnDetachedSelf(args, env, keepStderr = false) {
    const self = denoRuntime.selfCommand();
    // detached: the child leads a new session, as setsid(2) in nbdkit's fork.
    const child = new Deno.Command(self[0], {
      args: [...self.slice(1), ...args],
      env,
      stdin: "null",
      stdout: "piped",
      stderr: keepStderr ? "inherit" : "piped",
      detached: true,
    }).spawn();
    // With keepStderr the child writes to our stderr itself: nothing to relay.
    const relay = keepStderr ? null : child.stderr.getReader();
    const relaying = (async () => {
      while (relay) {
        const { value, done } = await relay.read();
        if (done) return;
        Deno.stderr.writeSync(value);
      }
    })().catch(() => {});
    const line = await readFirstLine(child.stdout);
    await relay?.cancel().catch(() => {});
    await relaying;
    child.unref();
    return line;
  },

  selfCommand() {
    const script = mainScript();
    return script ? [Deno.execPath(), "run", "-A", script] : [Deno.execPath()];
  },

  async stat(path): Promise<FileInfo | null> {
    try {
      const info = await Deno.stat(path);
      return { kind: kindOf(info), size: info.size };
    } catch (err) {
      if (err instanceof Deno.errors.NotFound) return null;
      throw err;
    }
  },

  async readDir(path) {
    const names: string[] = [];
    for await (const entry of Deno.readDir(path)) names.push(entry.name);
    return names;
  },

  openFile: (path, { write }) => openDenoFile(path, write),

  async mkfifo(path) {
    const out = await new Deno.Command("mkfifo", {
      args: ["-m", "600", "--", path],
      stderr: "piped",
    })
      .output();
    if (!out.success) {
      throw new Error(`mkfifo: ${new TextDecoder().decode(out.stderr).trim()}`);
    }
  },

  async openReadStream(path) {
    const file = await Deno.open(path, { read: true });
    if ((await file.stat()).isFifo) enlargeFifo(path, false);
    return file.readable;
  },

  async openWriteStream(path) {
    const info = await denoRuntime.stat(path);
    const truncate = info?.kind === "file";
    const file = await Deno.open(path, { write: true, truncate, create: info === null });
    if (info?.kind === "fifo") {
      return pacedFifo(path, file) ?? (enlargeFifo(path, true), file.writable);
    }
    return file.writable;
  },

  stdinStream() {
    enlargePipeFd(denoLibc(), 0);
    return Deno.stdin.readable;
  },
  stdoutStream() {
    enlargePipeFd(denoLibc(), 1);
    return Deno.stdout.writable;
  },
  writeTextFile: (path, text) => Deno.writeTextFile(path, text),
  async removeFile(path) {
    try {
      await Deno.remove(path);
    } catch (err) {
      if (!(err instanceof Deno.errors.NotFound)) throw err;
    }
  },
  async prepareTls(options) {
    if (options.psk) {
      throw new Error(
        "TLS pre-shared keys (--tls-psk) are not available on Deno, whose TLS (rustls) has no PSK: " +
          "run nbdkit-ts on Node (npx nbdkit-ts)",
      );
    }
    if (options.verifyPeer) {
      // Its node:tls demands a client certificate but accepts one from any CA.
      throw new Error(
        "client certificates (--tls-verify-peer) cannot be checked on Deno, whose node:tls " +
          "accepts any client certificate: run nbdkit-ts on Bun or Node",
      );
    }
    (await import("./node.ts")).prepareNodeTls(options);
  },
  uid: () => Deno.uid() ?? 0,
  makeTempDir: (prefix) => Deno.makeTempDir({ prefix }),
  removeDir: (path) => Deno.remove(path, { recursive: true }),
  resolvePath(path) {
    return path.startsWith("/") ? path : `${Deno.cwd()}/${path}`;
  },
  async importModule(path) {
    const url = new URL(`file://${denoRuntime.resolvePath(path)}`);
    return await import(url.href);
  },
};

const SIGNALS: Record<string, number> = {
  SIGHUP: 1,
  SIGINT: 2,
  SIGQUIT: 3,
  SIGABRT: 6,
  SIGKILL: 9,
  SIGSEGV: 11,
  SIGPIPE: 13,
  SIGALRM: 14,
  SIGTERM: 15,
};

function signalNumber(name: string): number {
  return SIGNALS[name] ?? 0;
}

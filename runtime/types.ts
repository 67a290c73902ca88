/**
 * The interface every runtime adapter (Deno, Bun, Node) implements. The rest
 * of the code base knows only this; `runtime/mod.ts` picks the adapter.
 *
 * @module
 */

/** A byte stream connection (TCP, Unix socket, stdio, pipe). */
export interface Connection {
  /** Bytes from the peer. */
  readonly readable: ReadableStream<Uint8Array>;
  /**
   * Bytes to the peer. A write of 64 KiB or more resolves only once the
   * runtime no longer needs the chunk (the server then reuses it); a smaller
   * chunk must not be changed after it is written.
   */
  readonly writable: WritableStream<Uint8Array>;
  /** Close both directions at once, dropping anything unsent. */
  close(): void;
  /**
   * Become the server side of a TLS session over this connection (NBD's
   * STARTTLS). Nobody may hold a reader or writer of this connection's
   * streams; nothing may have been read past the STARTTLS option. Resolves
   * once the TLS handshake has finished (and the client's certificate has
   * been checked, with `verifyPeer`), with the connection that carries the
   * protected bytes from then on; rejects, with a one-line message, when the
   * handshake fails. Absent where the runtime cannot do it.
   */
  startTls?(options: TlsServerOptions): Promise<Connection>;
}

/** A PEM file's text, with the path it was read from (for messages). */
export interface PemFile {
  /** Where it came from. */
  path: string;
  /** Its contents. */
  pem: string;
}

/**
 * A TLS server's credentials and policy, read once at start-up
 * (`server/tls.ts`) and checked by {@linkcode Runtime.prepareTls}.
 * Either a certificate and key, or pre-shared keys.
 */
export interface TlsServerOptions {
  /** The server's certificate (chain). */
  cert?: PemFile;
  /** The server's private key. */
  key?: PemFile;
  /** The certificate authority that signs client certificates. */
  ca?: PemFile;
  /** Revoked client certificates. */
  crl?: PemFile;
  /** Refuse clients without a certificate signed by `ca`. */
  verifyPeer: boolean;
  /** Pre-shared keys by identity (TLS-PSK instead of certificates). */
  psk?: Map<string, Uint8Array>;
}

/** Where a listener listens. */
export type ListenAddress =
  | { transport: "tcp"; hostname: string; port: number }
  | { transport: "unix"; path: string }
  /** A listening socket the server was given (systemd socket activation). */
  | { transport: "inherited"; fd: number };

/** A listening socket. */
export interface Listener {
  /** The address actually bound (the port is real when 0 was asked). */
  readonly address: ListenAddress;
  /** Stop accepting. Connections already accepted carry on. */
  close(): void;
}

/**
 * A file opened for random access.
 *
 * Failures, here and in {@linkcode Runtime.openFile}, reject with an `Error`
 * whose `code` is the errno's name (`"EACCES"`, `"ENOSPC"`, `"EOPNOTSUPP"`)
 * when the runtime knows it. The last three methods need libc through FFI
 * (Deno with `--allow-ffi`, Bun, Node with koffi) and are absent without it.
 */
export interface RandomAccessFile {
  /**
   * What the open file is, as opened: a path that names something else
   * since (a file swapped for a FIFO) has no say.
   */
  readonly kind: FileKind;
  /**
   * Read exactly `buf.length` bytes at `offset`; the end of the file before
   * that is an error (EIO), never zeroes. Returns nothing, at once, when the
   * page cache held all of them (so a cached read costs the request no
   * promise); a promise otherwise.
   */
  pread(buf: Uint8Array, offset: number): Promise<void> | undefined;
  /** Write all of `buf` at `offset`. */
  pwrite(buf: Uint8Array, offset: number): Promise<void>;
  /** The current size in bytes (of a block device too). */
  size(): Promise<number>;
  /** Make written data durable (fdatasync). */
  sync(): Promise<void>;
  /** Close the file. */
  close(): Promise<void>;
  /**
   * `fallocate(2)` over `length` bytes at `offset`: `"punch-hole"`
   * (`FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE`), `"zero-range"`
   * (`FALLOC_FL_ZERO_RANGE`) or `"allocate"` (mode 0). A file system that
   * cannot rejects with code `"EOPNOTSUPP"`.
   */
  fallocate?(
    mode: "punch-hole" | "zero-range" | "allocate",
    offset: number,
    length: number,
  ): Promise<void>;
  /**
   * `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`: where the next data or hole
   * at or after `offset` starts; null when no data follows `offset` (ENXIO).
   */
  seek?(offset: number, whence: "data" | "hole"): Promise<number | null>;
  /** `posix_fadvise(2)` over `length` bytes at `offset` (0: to the end). */
  advise?(
    offset: number,
    length: number,
    advice: "normal" | "random" | "sequential" | "willneed" | "dontneed",
  ): Promise<void>;
}

/** What kind of thing a path names. */
export type FileKind = "file" | "directory" | "fifo" | "socket" | "char" | "block" | "other";

/** The result of {@linkcode Runtime.stat}. */
export interface FileInfo {
  /** The kind of file. */
  kind: FileKind;
  /** Its size in bytes (0 for FIFOs and sockets). */
  size: number;
}

/** Options of {@linkcode Runtime.spawnShell}. */
export interface SpawnOptions {
  /** Extra environment variables on top of the server's own. */
  env?: Record<string, string>;
  /** Standard input of the child: inherited (default) or nothing. */
  stdin?: "inherit" | "null";
  /** Standard output of the child: inherited (default) or the server's stderr. */
  stdout?: "inherit" | "stderr";
}

/** Signals the server reacts to. */
export type SignalName = "SIGINT" | "SIGTERM" | "SIGHUP" | "SIGQUIT";

/** How a child process ended: an exit code, or the signal that killed it. */
export type ExitStatus = { code: number; signal: null } | { code: null; signal: number };

/** A command started by {@linkcode Runtime.spawnShell}. */
export interface ShellChild {
  /** Resolves when it has ended; rejects when it could not be started. */
  readonly status: Promise<ExitStatus>;
  /** Send it `signal` (nothing happens once it has ended). */
  kill(signal: SignalName): void;
}

/**
 * Everything the server and the plugins need from the runtime.
 */
export interface Runtime {
  /** Which runtime this is. */
  readonly name: "deno" | "bun" | "node";
  /** The runtime's own version string. */
  readonly version: string;
  /** Command line arguments after the script. */
  readonly args: string[];
  /** This process's id. */
  readonly pid: number;
  /** The parent process's id, read afresh on each call. */
  ppid(): number;
  /** An environment variable. */
  env(name: string): string | undefined;
  /** End the process. */
  exit(code: number): never;
  /** Write text to stderr, synchronously (log lines must not be lost at exit). */
  writeStderr(text: string): void;
  /** Write text to stdout, synchronously. */
  writeStdout(text: string): void;
  /** Whether stderr is a terminal. */
  stderrIsTerminal(): boolean;
  /** Call `handler` on `signal`; the default action is replaced. */
  onSignal(signal: SignalName, handler: () => void): void;
  /**
   * Make SIGUSR1 end the process, as it ends nbdkit, instead of opening the
   * runtime's debugger (Deno from 2.9.2 and Node start an inspector on
   * 127.0.0.1:9229 on SIGUSR1, through which anyone on the machine could
   * run code as the server's user).
   */
  endOnSigusr1(): void;

  /**
   * Listen on TCP at `hostname` (`::` or `0.0.0.0` for every address of one
   * family: server/serve.ts decides what "every address" means); `onConnection`
   * is called for each accepted client. `ipv6Only` keeps `::` from taking
   * IPv4 clients too (`-6`); on Deno it needs FFI.
   */
  listenTcp(
    hostname: string,
    port: number,
    onConnection: (conn: Connection) => void,
    options?: { ipv6Only?: boolean },
  ): Promise<Listener>;
  /**
   * The addresses of one family a host name resolves to (`getaddrinfo`, so
   * `/etc/hosts` counts), in the resolver's order; rejects when it has none.
   */
  lookup(hostname: string, family: 4 | 6): Promise<string[]>;
  /**
   * Listen on a Unix socket at `path`, replacing a stale socket file; a
   * socket somebody listens on is refused with "PATH: Address already in use".
   */
  listenUnix(path: string, onConnection: (conn: Connection) => void): Promise<Listener>;
  /**
   * Accept connections on a socket that is already listening, open as
   * descriptor `fd` (socket activation: systemd, `nbdinfo -- [ … ]`).
   */
  listenFd(fd: number, onConnection: (conn: Connection) => void): Promise<Listener>;
  /** Connect to a Unix socket. */
  connectUnix(path: string): Promise<Connection>;
  /** Standard input and output as one connection (for `-s`). */
  stdio(): Connection;

  /** Start `command` with `/bin/sh -c`, in the server's process group (Ctrl-C reaches both). */
  spawnShell(command: string, options?: SpawnOptions): ShellChild;
  /**
   * Start this same program again, detached (its own session, stdin from
   * /dev/null), with `args`, and resolve once it has written one line on its
   * stdout (which is returned; "" if it exited first). Until then its stderr
   * is relayed to ours; after that its stdout and stderr lead nowhere, so the
   * caller can exit and whoever waits on our output is not held up. With
   * `keepStderr` (nbdkit's `-v` in the background) it writes to our stderr
   * itself, before and after, for as long as it runs.
   */
  spawnDetachedSelf(
    args: string[],
    env: Record<string, string>,
    keepStderr?: boolean,
  ): Promise<string>;
  /** The argv prefix that starts this program again (runtime binary and script). */
  selfCommand(): string[];

  /** Information about a path, or null when it does not exist. */
  stat(path: string): Promise<FileInfo | null>;
  /** The names of a directory's entries (not `.` and `..`), in no particular order. */
  readDir(path: string): Promise<string[]>;
  /** Open a file for random access. */
  openFile(path: string, options: { write: boolean }): Promise<RandomAccessFile>;
  /** Create a FIFO (mode 0600). */
  mkfifo(path: string): Promise<void>;
  /**
   * Open a file, FIFO or character device as a sequential byte stream. Opening
   * a FIFO waits until the other end is opened, without blocking the event loop.
   */
  openReadStream(path: string): Promise<ReadableStream<Uint8Array>>;
  /** As {@linkcode openReadStream}, for writing. */
  openWriteStream(path: string): Promise<WritableStream<Uint8Array>>;
  /** Standard input as a stream (`read=-`). */
  stdinStream(): ReadableStream<Uint8Array>;
  /** Standard output as a stream (`write=-`). */
  stdoutStream(): WritableStream<Uint8Array>;
  /** Write a whole text file. */
  writeTextFile(path: string, text: string): Promise<void>;
  /** Remove a file, ignoring a missing one. */
  removeFile(path: string): Promise<void>;
  /**
   * Check TLS credentials once, at start-up, and keep them ready for
   * {@linkcode Connection.startTls}. Throws a one-line error for a
   * certificate or key that cannot be used, or for what this runtime's TLS
   * stack lacks (pre-shared keys need Node; client certificates are not
   * checked by Deno's).
   */
  prepareTls(options: TlsServerOptions): Promise<void>;
  /** This process's user id (0: root), which decides nbdkit's default certificate folder. */
  uid(): number;
  /** Make a fresh temporary directory. */
  makeTempDir(prefix: string): Promise<string>;
  /** Remove a directory and everything in it. */
  removeDir(path: string): Promise<void>;
  /** Resolve a path against the current directory. */
  resolvePath(path: string): string;
  /** Import a plugin module from a file path. */
  importModule(path: string): Promise<Record<string, unknown>>;
}

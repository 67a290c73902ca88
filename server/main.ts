/**
 * The command line program: nbdkit's options and behaviour on top of
 * {@linkcode startServer}.
 *
 * @module
 */
import { BUILTIN_PLUGINS } from "../plugins/builtin.ts";
import { messageOf } from "../plugins/errors.ts";
import type { Plugin } from "../plugins/plugin.ts";
import { runtime } from "../runtime/mod.ts";
import type { ShellChild } from "../runtime/types.ts";
import { VERSION } from "../version.ts";
import { type CliArgs, parseCli, UsageError } from "./cli_args.ts";
import { logConfig, logContext, Logger } from "./log.ts";
import { type Server, startServer } from "./serve.ts";
import { loadTls, type TlsConfig, tlsLevel } from "./tls.ts";
import { uriOf } from "./uri.ts";
import { type Activation, socketActivation } from "./socket_activation.ts";
import { osMessage } from "./os_message.ts";
import { setStdioSafe } from "../plugins/stdio.ts";
import { setDebugSink } from "../plugins/debug.ts";

/** Set in the environment of the background child, which then reports readiness on stdout. */
const DAEMON_ENV = "NBDKIT_TS_DAEMON";

/** A stop that a signal asked for and that takes longer than this says what it waits for. */
const NOTICE_MS = 2000;

/** How to call it: the start of `--help`, and all of `PLUGIN --help` before the plugin's part. */
const SYNOPSIS = `nbdkit-ts [-U SOCKET|-] [-p PORT] [-i IPADDR] [-4|-6] [-f] [-r] [-e EXPORTNAME]
          [-s] [--run 'COMMAND ARGS ...'] [-P PIDFILE] [--exit-with-parent]
          [-t THREADS] [--no-sr] [--no-mc] [--mask-handshake=MASK]
          [--print-uri] [-v] [--log=stderr|null] [--timeout=SECS]
          [--tls=off|on|require] [--tls-certificates=DIR] [--tls-psk=FILE]
          [--tls-verify-peer]
          PLUGIN [[KEY=]VALUE [KEY=VALUE [...]]]

nbdkit-ts --dump-config
nbdkit-ts PLUGIN --dump-plugin
nbdkit-ts PLUGIN --help
nbdkit-ts --help
nbdkit-ts -V|--version
`;

/** Usage text of `--help`. */
export const USAGE = `${SYNOPSIS}
An NBD server with nbdkit's command line, written in TypeScript.

PLUGIN is a built-in plugin (${Object.keys(BUILTIN_PLUGINS).join(", ")})
or the path of a .ts/.js module whose default export is a plugin.

Options:
  -U, --unix SOCKET|-     Listen on a Unix socket ('-': a private one, for --run).
  -p, --port PORT         Listen on TCP port PORT (default 10809).
  -i, --ipaddr IPADDR     Listen on this address only.
  -4, --ipv4-only         Without -i: every IPv4 address only; with -i NAME: its IPv4 addresses.
  -6, --ipv6-only         The same for IPv6 (no IPv4 clients through '::').
  -f, --foreground        Do not go to the background once listening.
  -r, --readonly          Every client is read-only.
  -e, --exportname NAME   The export that --run's $uri names (what is served does not change).
  -s, --single            Serve one client on stdin/stdout, then exit.
  --run 'COMMAND'         Captive mode: run COMMAND with $uri, $nbd, $unixsocket,
                          $port, $exportname, $tls set; exit with its status.
  -P, --pidfile FILE      Write the server's process id to FILE once listening.
  --exit-with-parent      Exit when the parent process exits (implies -f).
  -t, --threads N         Requests in flight per connection (default 16).
  --no-sr                 Do not offer structured replies.
  --no-mc                 Do not offer metadata contexts (block status).
  --mask-handshake=MASK   Advertise only these global handshake flags.
  --print-uri             Print the server's URI on stdout once listening.
  -v, --verbose           Debug messages on stderr (each option and request).
  --log=stderr|null       Where messages go (default stderr).
  --timeout=SECS          Drop clients that have not finished the handshake (default 60).
  --tls=off|on|require    TLS refused / offered / required (STARTTLS). Without --tls:
                          on when certificates or keys are given or found.
  --tls-certificates=DIR  DIR holds ca-cert.pem, server-cert.pem, server-key.pem
                          (default /etc/pki/nbdkit for root, else ~/.pki/nbdkit
                          or ~/.config/pki/nbdkit).
  --tls-psk=FILE          Pre-shared keys instead of certificates: 'identity:hexkey'
                          lines, as psktool writes them (Node only).
  --tls-verify-peer       Refuse clients without a certificate signed by ca-cert.pem
                          (Node and Bun).
  --dump-config           Print the server's configuration and exit.
  -V, --version           Print the version and exit.

Socket activation: with LISTEN_PID (this process) and LISTEN_FDS set, as
systemd and 'nbdinfo -- [ nbdkit-ts ... ]' do, the server serves the
listening sockets it is given (implies -f; -s, -U, -p, -i and --run refused).
`;

// What Deno's permission errors end with; one of them names only the first
// permission missing, so the line says all that the server may need.
const DENO_PERMISSION = /run again with the --allow-\w+ flag$/;
const DENO_PERMISSIONS = "nbdkit-ts needs --allow-read, --allow-write, --allow-net, " +
  "--allow-env and --allow-sys; --allow-run for --run, --allow-ffi for libvirt; -A gives them all";

function say(line: string): void {
  const hint = DENO_PERMISSION.test(line) ? ` (${DENO_PERMISSIONS})` : "";
  runtime.writeStderr(`nbdkit-ts: ${line}${hint}\n`);
}

/** Load a plugin by built-in name or module path. */
async function loadPlugin(name: string): Promise<Plugin<unknown>> {
  const builtin = BUILTIN_PLUGINS[name];
  if (builtin) return await builtin();
  if (!name.includes("/") && !/\.(ts|js|mjs|mts)$/.test(name)) {
    throw new Error(
      `cannot open plugin '${name}': no built-in plugin of that name ` +
        `(built-in: ${Object.keys(BUILTIN_PLUGINS).join(", ")}); give a path to load a module`,
    );
  }
  const path = runtime.resolvePath(name);
  if ((await runtime.stat(path)) === null) {
    throw new Error(`cannot open plugin '${name}': ${path}: No such file or directory`);
  }
  if (/\.so(\.\d+)*$/.test(name)) {
    throw new Error(
      `cannot open plugin '${name}': a shared library is a C plugin for nbdkit; nbdkit-ts ` +
        `runs its built-in plugins and TypeScript or JavaScript modules`,
    );
  }
  let mod: Record<string, unknown>;
  try {
    mod = await runtime.importModule(path);
  } catch (err) {
    throw new Error(`cannot open plugin '${name}': ${importFailure(err)}`);
  }
  const plugin = (mod.default ?? mod.plugin) as Plugin<unknown> | undefined;
  if (typeof plugin === "function") {
    throw new Error(
      `cannot open plugin '${name}': its default export is a function, not a plugin ` +
        `(export the plugin object: export default definePlugin({ … }))`,
    );
  }
  if (!plugin || typeof plugin !== "object") {
    throw new Error(
      `cannot open plugin '${name}': the module has no default export that is a plugin`,
    );
  }
  if (typeof plugin.name !== "string" || plugin.name === "") {
    throw new Error(`cannot open plugin '${name}': the plugin has no name (a string)`);
  }
  const missing = (["open", "getSize", "pread"] as const)
    .filter((callback) => typeof plugin[callback] !== "function");
  if (missing.length > 0) {
    throw new Error(
      `cannot open plugin '${name}': plugin '${plugin.name}' must define ` +
        `${missing.map((m) => `${m}()`).join(", ")} (every plugin has open, getSize and pread)`,
    );
  }
  return plugin;
}

/**
 * Why a plugin module could not be imported, on one line, whatever the
 * runtime's wording: without Deno's colours and code frame, with the place
 * of Bun's first syntax error, with advice where Node cannot load TypeScript.
 */
function importFailure(err: unknown): string {
  const first = err instanceof AggregateError && err.errors.length > 0 ? err.errors[0] : err;
  const e = first as {
    name?: unknown;
    code?: unknown;
    message?: unknown;
    position?: { file?: string; line?: number; column?: number } | null;
  } | null;
  if (e?.code === "ERR_UNKNOWN_FILE_EXTENSION" && /\.[mc]?ts\b/.test(String(e.message))) {
    return "this Node cannot import TypeScript: compile the plugin to JavaScript, use " +
      "Node 22.18 or later (which strips types), or run nbdkit-ts on Deno or Bun";
  }
  let text = typeof e?.message === "string" ? e.message : String(first);
  if (e?.name === "SyntaxError" && !text.startsWith("SyntaxError")) text = `SyntaxError: ${text}`;
  if (e?.position?.file) text += ` at ${e.position.file}:${e.position.line}:${e.position.column}`;
  return text
    // deno-lint-ignore no-control-regex
    .replace(/\x1b\[[0-9;]*m/g, "")
    .split("\n")
    .filter((line) => !/^\s*\d*\s*\|/.test(line))
    .join(" ")
    .replace(/\s+/g, " ")
    .trim();
}

function dumpPlugin(plugin: Plugin<unknown>, name: string): string {
  const lines = [
    `path=${BUILTIN_PLUGINS[name] ? "(built-in)" : runtime.resolvePath(name)}`,
    `name=${plugin.name}`,
    `version=${plugin.version ?? ""}`,
    `thread_model=${plugin.threadModel ?? "parallel"}`,
  ];
  if (plugin.magicConfigKey) lines.push(`magic_config_key=${plugin.magicConfigKey}`);
  const callbacks: Array<[keyof Plugin<unknown>, string]> = [
    ["config", "config"],
    ["configComplete", "config_complete"],
    ["configHelp", "config_help"],
    ["getReady", "get_ready"],
    ["unload", "unload"],
    ["listExports", "list_exports"],
    ["defaultExport", "default_export"],
    ["open", "open"],
    ["close", "close"],
    ["getSize", "get_size"],
    ["exportDescription", "export_description"],
    ["blockSize", "block_size"],
    ["canWrite", "can_write"],
    ["canFlush", "can_flush"],
    ["isRotational", "is_rotational"],
    ["canTrim", "can_trim"],
    ["canZero", "can_zero"],
    ["canFastZero", "can_fast_zero"],
    ["canFua", "can_fua"],
    ["canMultiConn", "can_multi_conn"],
    ["canCache", "can_cache"],
    ["canExtents", "can_extents"],
    ["pread", "pread"],
    ["pwrite", "pwrite"],
    ["flush", "flush"],
    ["trim", "trim"],
    ["zero", "zero"],
    ["extents", "extents"],
    ["cache", "cache"],
  ];
  for (const [key, cname] of callbacks) {
    if (plugin[key] !== undefined) lines.push(`has_${cname}=1`);
  }
  return lines.join("\n") + "\n";
}

function dumpConfig(): string {
  const [major, minor] = VERSION.split(".");
  // nbdkit's keys where they apply (scripts read version_major and
  // exit_with_parent), sorted as nbdkit prints them, and our own.
  return [
    `binary=${runtime.selfCommand().join(" ")}`,
    `exit_with_parent=yes`,
    `max_request_size=${64 * 1024 * 1024}`,
    `name=nbdkit-ts`,
    `plugins=${Object.keys(BUILTIN_PLUGINS).join(" ")}`,
    `root_tls_certificates_dir=/etc/pki/nbdkit`,
    `runtime=${runtime.name}`,
    `runtime_version=${runtime.version}`,
    `tls=yes`,
    `version=${VERSION}`,
    `version_major=${major}`,
    `version_minor=${minor}`,
  ].join("\n") + "\n";
}

async function configure(plugin: Plugin<unknown>, args: CliArgs): Promise<void> {
  const log = new Logger();
  for (const { key, value } of args.params) {
    let k = key;
    if (k === null) {
      if (!plugin.magicConfigKey) {
        throw new Error(
          `plugin '${plugin.name}' does not take a bare value: '${value}' (expected KEY=VALUE)`,
        );
      }
      k = plugin.magicConfigKey;
    }
    if (!plugin.config) throw new Error(`unknown parameter '${k}'`);
    log.debug(`${plugin.name}: config key=${k}, value=${value}`);
    await plugin.config(k, value);
  }
  log.debug(`${plugin.name}: config_complete`);
  await plugin.configComplete?.();
  log.debug(`using thread model: ${plugin.threadModel ?? "parallel"}`);
}

function checkCombinations(args: CliArgs): void {
  if (args.single && args.run !== undefined) {
    throw new UsageError("-s and --run cannot be used together");
  }
  if (args.single && (args.unixSocket !== undefined || args.port !== undefined)) {
    throw new UsageError("-s cannot be used with -U or -p");
  }
  if (args.unixSocket !== undefined && args.port !== undefined) {
    throw new UsageError("-p and -U cannot be used together");
  }
  if (args.unixSocket === "-" && args.run === undefined && !args.printUri) {
    throw new UsageError("-U - requires --run or --print-uri (the socket name is private)");
  }
}

/** Whether `--tls` itself is on the command line (`args.tls` is "off" either way). */
function tlsOptionGiven(argv: string[]): boolean {
  for (const arg of argv) {
    if (arg === "--") return false;
    if (arg === "--tls" || arg.startsWith("--tls=")) return true;
  }
  return false;
}

/** Go to the background: start ourselves again in the foreground, detached, and wait until it listens. */
async function daemonize(argv: string[], verbose: boolean): Promise<number> {
  // As nbdkit: in the background, messages go nowhere unless -v asks for them.
  const line = await runtime.spawnDetachedSelf(["-f", ...argv], { [DAEMON_ENV]: "1" }, verbose);
  if (!line.startsWith("ready")) return 1;
  const uri = line.slice("ready ".length);
  return uri ? (runtime.writeStdout(`${uri}\n`), 0) : 0;
}

/**
 * Run the command line.
 *
 * @param argv The arguments after the program name.
 * @returns The exit status.
 */
export async function main(argv: string[]): Promise<number> {
  try {
    return await run(argv);
  } catch (err) {
    // What no step below expected (Deno refusing a temporary directory
    // without --allow-write, say): one line, not a stack trace.
    say(`error: ${messageOf(err)}`);
    return 1;
  }
}

async function run(argv: string[]): Promise<number> {
  let args: CliArgs;
  try {
    args = parseCli(argv);
    // Options that only print something ignore the ones that serve, as nbdkit's do.
    if (!args.version && !args.help && !args.dumpConfig && !args.dumpPlugin) {
      checkCombinations(args);
    }
  } catch (err) {
    say(messageOf(err));
    return 1;
  }
  logConfig.verbose = args.verbose;
  logConfig.target = args.log;

  const versionLine = `nbdkit-ts ${VERSION} (${runtime.name} ${runtime.version})\n`;
  if (args.version && args.plugin === undefined) {
    runtime.writeStdout(versionLine);
    return 0;
  }
  if (args.dumpConfig) {
    runtime.writeStdout(dumpConfig());
    return 0;
  }
  if (args.plugin === undefined) {
    if (args.help) {
      runtime.writeStdout(USAGE);
      return 0;
    }
    say("error: no plugin given on the command line; see 'nbdkit-ts --help'");
    return 1;
  }

  // Before any plugin code runs: its module may look, as nbdkit plugins do.
  setStdioSafe(!args.single);
  const serverLog = new Logger();
  setDebugSink((message) => serverLog.debug(message));
  let plugin: Plugin<unknown>;
  try {
    plugin = await loadPlugin(args.plugin);
  } catch (err) {
    say(`error: ${messageOf(err)}`);
    return 1;
  }
  // A plugin's debug() lines, with -v only (Logger.debug checks), under its name.
  const pluginLog = new Logger(plugin.name);
  // Inside a connection the line names it, as nbdkit's do (serve.ts sets
  // the context with -v only, and only with -v does debug() print).
  setDebugSink((message) => {
    const where = logContext.current();
    (where === undefined ? pluginLog : new Logger(where)).debug(message);
  });
  if (args.help) {
    // As nbdkit: how to call the server, then the plugin and its parameters.
    const where = BUILTIN_PLUGINS[args.plugin] ? "built-in" : runtime.resolvePath(args.plugin);
    runtime.writeStdout(
      `${SYNOPSIS}\nplugin: ${plugin.name}${plugin.longname ? ` (${plugin.longname})` : ""}\n` +
        `(${where})\n${plugin.configHelp ?? "This plugin takes no parameters."}\n`,
    );
    return 0;
  }
  if (args.version) {
    // As nbdkit: the server's version, then the plugin's.
    runtime.writeStdout(`${versionLine}${plugin.name} ${plugin.version ?? ""}\n`);
    return 0;
  }
  if (args.dumpPlugin) {
    runtime.writeStdout(dumpPlugin(plugin, args.plugin));
    return 0;
  }

  let tls: TlsConfig | null;
  try {
    tls = await loadTls({
      // Absent --tls is not --tls=off: nbdkit then turns TLS on if it has credentials.
      mode: args.tls === "off" && !tlsOptionGiven(argv) ? undefined : args.tls,
      certificates: args.tlsCertificates,
      psk: args.tlsPsk,
      verifyPeer: args.tlsVerifyPeer,
    });
  } catch (err) {
    say(`error: ${messageOf(err)}`);
    return 1;
  }

  let activation: Activation;
  try {
    activation = socketActivation(
      runtime.env("LISTEN_PID"),
      runtime.env("LISTEN_FDS"),
      runtime.pid,
    );
  } catch (err) {
    say(`error: ${messageOf(err)}`);
    return 1;
  }
  const listenFds = activation.kind === "fds" ? activation.fds : undefined;
  if (listenFds) {
    const given = [
      ["-s", args.single],
      ["-U", args.unixSocket !== undefined],
      ["-p", args.port !== undefined],
      ["-i", args.ipaddr !== undefined],
      ["--run", args.run !== undefined],
    ].filter(([, on]) => on).map(([name]) => name);
    if (given.length > 0) {
      say(`error: cannot use socket activation with ${given.join(" or ")}`);
      return 1;
    }
  }

  // Socket activation implies -f, as with nbdkit: the parent waits on this process.
  const background = !args.foreground && args.run === undefined && !args.single &&
    !args.exitWithParent && !listenFds && runtime.env(DAEMON_ENV) !== "1";
  // The server in the background says all this again, so this process stays quiet.
  if (background) logConfig.verbose = false;
  const log = new Logger();
  log.debug(versionLine.trim());
  log.debug(`loaded plugin ${args.plugin} (name ${plugin.name})`);
  if (activation.kind === "not-ours") {
    log.debug(`LISTEN_PID=${activation.pid} is not ours: socket activation ignored`);
  }
  try {
    await configure(plugin, args);
  } catch (err) {
    say(`error: ${messageOf(err)}`);
    return 1;
  }
  if (background) return await daemonize(argv, args.verbose);

  let privateDir: string | undefined;
  let unixSocket = args.unixSocket;
  if (unixSocket === "-") {
    privateDir = await runtime.makeTempDir("nbdkit-ts");
    unixSocket = `${privateDir}/socket`;
  }

  // The signal handlers go in before the server listens, as nbdkit's do: a
  // signal sent once the socket is there must find them (a shell starts
  // background commands with SIGINT and SIGQUIT ignored, and SIGTERM's
  // default would leave the socket behind).
  let server: Server | undefined;
  // The pid file once we write it: one there before is somebody else's.
  let pidfile: string | undefined;
  let stopping: Promise<void> | null = null;
  let stopped = false;
  const stop = () => {
    stopping ??= (async () => {
      await server?.close();
      if (pidfile) await runtime.removeFile(pidfile).catch(() => {});
      if (privateDir) await runtime.removeDir(privateDir).catch(() => {});
      stopped = true;
    })();
    return stopping;
  };
  // Exiting without waiting still takes away what is ours and would be left
  // stale: the pid file, the private directory, and a socket we listen on (one
  // not yet listened on may be another server's). A removal that hangs does
  // not hold the exit up for long.
  let exiting = false;
  const exitNow = () => {
    if (exiting) return;
    exiting = true;
    const removals = [
      pidfile ? runtime.removeFile(pidfile) : null,
      privateDir ? runtime.removeDir(privateDir) : null,
      server?.address?.transport === "unix" && !privateDir
        ? runtime.removeFile(server.address.path)
        : null,
    ].map((removal) => removal?.catch(() => {}));
    const timeout = new Promise((resolve) => setTimeout(resolve, 500));
    Promise.race([Promise.all(removals), timeout]).then(() => runtime.exit(1));
  };
  let captive: ShellChild | null = null; // the --run command, while it runs
  // Once the --run command has ended, its status is the exit status and the
  // --run branch below stops the server and returns it.
  let runEnded = false;
  let signalled = false;
  let starting = true;
  runtime.endOnSigusr1();
  for (const signal of ["SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT"] as const) {
    runtime.onSignal(signal, () => {
      // A second signal while a graceful stop waits (say, for a streaming
      // reader that never comes) means: stop now. Counting signals rather
      // than looking at whether a stop began matters: Ctrl-C reaches the
      // --run command too, and its end may be seen before our own handler
      // runs, which then is the first signal, not a second one.
      if (signalled) {
        say(`${signal} again: exiting without waiting`);
        exitNow();
        return;
      }
      signalled = true;
      if (server) stop();
      // Say why the process is still there when the stop takes a while.
      setTimeout(() => {
        if (stopped && !captive) return;
        const what = captive
          ? "the --run command to exit"
          : server
          ? "the requests in flight to finish"
          : "the plugin to finish starting";
        say(`${signal}: waiting for ${what}; ${signal} again exits at once`);
      }, NOTICE_MS);
      if (captive) {
        // The command's status is the exit status (the --run branch
        // returns it): pass the signal on (Ctrl-C has already reached it,
        // kill(1) only us), then wait for the command, as nbdkit does.
        captive.kill(signal);
        return;
      }
      // Still starting (up to the pid file written): the start-up below stops.
      if (runEnded || starting) return;
      stop().then(() => runtime.exit(0));
    });
  }

  try {
    server = await startServer(plugin, {
      unixSocket: unixSocket === undefined ? undefined : runtime.resolvePath(unixSocket),
      port: args.port,
      hostname: args.ipaddr,
      family: args.family,
      stdio: args.single,
      listenFds,
      readonly: args.readonly,
      threads: args.threads,
      structuredReplies: !args.noSr,
      metaContexts: !args.noMc,
      maskHandshake: args.maskHandshake,
      handshakeTimeout: args.timeout,
      tls: tls ?? undefined,
    });
  } catch (err) {
    say(`error: ${messageOf(err)}`);
    if (privateDir) await runtime.removeDir(privateDir).catch(() => {});
    return 1;
  }
  if (signalled) {
    await stop();
    return 0;
  }

  let uri = server.address ? uriOf(server.address, args.exportName) : "";
  // As nbdkit: nbds:// only when TLS is required (with --tls=on a client may use either).
  if (tls?.required) uri = uri.replace(/^nbd(\+unix)?:/, "nbds$1:");
  if (args.pidfile) {
    pidfile = args.pidfile;
    try {
      await runtime.writeTextFile(pidfile, `${runtime.pid}\n`);
    } catch (err) {
      say(`error: ${pidfile}: ${osMessage(err)}`);
      pidfile = undefined; // not ours to remove
      await stop();
      return 1;
    }
  }
  // A signal while the pid file was written has begun the stop, which may have
  // removed the file before it was there: the --run command must not start.
  starting = false;
  if (signalled) {
    await stop();
    if (pidfile) await runtime.removeFile(pidfile).catch(() => {});
    return 0;
  }
  if (runtime.env(DAEMON_ENV) === "1") {
    runtime.writeStdout(`ready ${args.printUri ? uri : ""}\n`);
  } else if (args.printUri) {
    runtime.writeStdout(`${uri}\n`);
  }

  if (args.exitWithParent) {
    const parent = runtime.ppid();
    const timer = setInterval(() => {
      if (runtime.ppid() !== parent) {
        clearInterval(timer);
        stop().then(() => runtime.exit(0));
      }
    }, 1000);
  }

  if (args.run !== undefined) {
    const address = server.address!;
    const env: Record<string, string> = {
      uri,
      nbd: uri,
      exportname: args.exportName,
      unixsocket: address.transport === "unix" ? address.path : "",
      port: address.transport === "tcp" ? String(address.port) : "",
      tls: String(tlsLevel(tls)),
    };
    let status: number;
    try {
      captive = runtime.spawnShell(args.run, { env });
      const ended = await captive.status;
      if (ended.signal !== null) say(`external command was killed by signal ${ended.signal}`);
      status = ended.signal !== null ? 128 + ended.signal : ended.code;
    } catch (err) {
      say(`error: --run: ${messageOf(err)}`);
      status = 1;
    } finally {
      captive = null;
      runEnded = true;
    }
    await stop();
    return status;
  }

  await server.finished;
  await stop();
  return 0;
}

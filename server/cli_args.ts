/**
 * Parsing nbdkit's command line: options anywhere (as getopt permutes them),
 * then a plugin name or path, then `key=value` parameters or a bare value
 * for the plugin's magic key.
 *
 * @module
 */

/** Parsed command line. */
export interface CliArgs {
  unixSocket?: string;
  port?: number;
  ipaddr?: string;
  /** `-4` or `-6`, the last one given. */
  family?: 4 | 6;
  foreground: boolean;
  readonly: boolean;
  exportName: string;
  single: boolean;
  run?: string;
  pidfile?: string;
  exitWithParent: boolean;
  threads: number;
  noSr: boolean;
  noMc: boolean;
  maskHandshake?: number;
  tls: "off" | "on" | "require";
  tlsCertificates?: string;
  tlsPsk?: string;
  tlsVerifyPeer: boolean;
  printUri: boolean;
  verbose: boolean;
  log: "stderr" | "null";
  timeout?: number;
  dumpConfig: boolean;
  dumpPlugin: boolean;
  help: boolean;
  version: boolean;
  /** The plugin name or path. */
  plugin?: string;
  /** Parameters in order; a bare value has key null. */
  params: Array<{ key: string | null; value: string }>;
}

/** A command line error: printed as one line, exit status 1. */
export class UsageError extends Error {
  /** Create the error. */
  constructor(message: string) {
    super(message);
    this.name = "UsageError";
  }
}

/** Requests in flight per connection without `-t` (or with `-t 0`). */
const DEFAULT_THREADS = 16;

type Spec = { name: keyof CliArgs | "ignore" | "newstyle" | "ipv4" | "ipv6"; arg: boolean };

const LONG: Record<string, Spec> = {
  unix: { name: "unixSocket", arg: true },
  port: { name: "port", arg: true },
  ipaddr: { name: "ipaddr", arg: true },
  "ip-addr": { name: "ipaddr", arg: true },
  "ipv4-only": { name: "ipv4", arg: false },
  "ipv6-only": { name: "ipv6", arg: false },
  foreground: { name: "foreground", arg: false },
  "no-fork": { name: "foreground", arg: false },
  readonly: { name: "readonly", arg: false },
  "read-only": { name: "readonly", arg: false },
  exportname: { name: "exportName", arg: true },
  "export-name": { name: "exportName", arg: true },
  export: { name: "exportName", arg: true },
  single: { name: "single", arg: false },
  stdin: { name: "single", arg: false },
  run: { name: "run", arg: true },
  pidfile: { name: "pidfile", arg: true },
  "pid-file": { name: "pidfile", arg: true },
  "exit-with-parent": { name: "exitWithParent", arg: false },
  threads: { name: "threads", arg: true },
  "no-sr": { name: "noSr", arg: false },
  "no-structured-replies": { name: "noSr", arg: false },
  "no-mc": { name: "noMc", arg: false },
  "no-meta-contexts": { name: "noMc", arg: false },
  "mask-handshake": { name: "maskHandshake", arg: true },
  tls: { name: "tls", arg: true },
  "tls-certificates": { name: "tlsCertificates", arg: true },
  "tls-psk": { name: "tlsPsk", arg: true },
  "tls-verify-peer": { name: "tlsVerifyPeer", arg: false },
  "print-uri": { name: "printUri", arg: false },
  verbose: { name: "verbose", arg: false },
  log: { name: "log", arg: true },
  timeout: { name: "timeout", arg: true },
  "dump-config": { name: "dumpConfig", arg: false },
  "dump-plugin": { name: "dumpPlugin", arg: false },
  help: { name: "help", arg: false },
  version: { name: "version", arg: false },
  debug: { name: "ignore", arg: true },
  newstyle: { name: "newstyle", arg: false },
  "new-style": { name: "newstyle", arg: false },
};

const SHORT: Record<string, string> = {
  U: "unix",
  p: "port",
  i: "ipaddr",
  "4": "ipv4-only",
  "6": "ipv6-only",
  f: "foreground",
  r: "readonly",
  e: "exportname",
  s: "single",
  P: "pidfile",
  t: "threads",
  v: "verbose",
  V: "version",
  D: "debug",
  n: "newstyle",
};

/** Options nbdkit has that this server refuses, with the reason. */
const UNSUPPORTED: Record<string, string> = {
  filter: "filters are not supported by nbdkit-ts",
  oldstyle: "the oldstyle protocol is not supported",
  "old-style": "the oldstyle protocol is not supported",
  o: "the oldstyle protocol is not supported",
  vsock: "AF_VSOCK is not supported",
  user: "changing user is not supported; use your service manager",
  u: "changing user is not supported; use your service manager",
  group: "changing group is not supported; use your service manager",
  g: "changing group is not supported; use your service manager",
  swap: "--swap is not supported",
  "selinux-label": "--selinux-label is not supported",
};

function integer(option: string, text: string, min: number, max: number): number {
  // Decimal, or hexadecimal with 0x as nbdkit also takes (not its octal:
  // a leading zero meaning base 8 would surprise more than it would help).
  if (!/^\s*(\d+|0[xX][0-9a-fA-F]+)\s*$/.test(text)) {
    throw new UsageError(`${option}: '${text}' is not a number`);
  }
  const n = Number(text);
  if (n < min || n > max) throw new UsageError(`${option}: ${n} is out of range (${min}–${max})`);
  return n;
}

function apply(args: CliArgs, option: string, spec: Spec, value: string | undefined): void {
  const v = value ?? "";
  switch (spec.name) {
    case "port":
      // nbdkit takes service names too; "nbd" is the one that matters (/etc/services).
      args.port = v === "nbd" ? 10809 : integer(option, v, 0, 65535);
      return;
    case "threads":
      // 0, as with nbdkit: the default.
      args.threads = integer(option, v, 0, 1024) || DEFAULT_THREADS;
      return;
    case "timeout":
      args.timeout = integer(option, v, 0, 86400);
      return;
    case "maskHandshake":
      args.maskHandshake = integer(option, v, 0, 0xffff);
      return;
    case "tls":
      if (v !== "off" && v !== "on" && v !== "require") {
        throw new UsageError(`--tls: '${v}' must be off, on or require`);
      }
      args.tls = v;
      return;
    case "log":
      if (v !== "stderr" && v !== "null") {
        throw new UsageError(`--log: '${v}' must be stderr or null`);
      }
      args.log = v;
      return;
    case "ipv4":
    case "ipv6":
      args.family = spec.name === "ipv4" ? 4 : 6;
      return;
    case "ignore":
    case "newstyle":
      return;
    default: {
      const key = spec.name as keyof CliArgs;
      // deno-lint-ignore no-explicit-any
      (args as any)[key] = spec.arg ? v : true;
    }
  }
}

/** A parameter key as nbdkit accepts it; anything else before '=' makes a bare value. */
const KEY = /^[A-Za-z_][A-Za-z0-9_.-]*$/;

/**
 * Parse the command line.
 *
 * @param argv The arguments after the program name.
 * @returns The parsed arguments.
 * @throws {UsageError} For unknown options or missing option values.
 *
 * @example
 * ```ts
 * import { parseCli } from "./cli_args.ts";
 * const a = parseCli(["-U", "-", "memory", "size=1G", "--run", "nbdinfo $uri"]);
 * console.assert(a.plugin === "memory" && a.params[0].value === "1G" && a.run === "nbdinfo $uri");
 * ```
 */
export function parseCli(argv: string[]): CliArgs {
  const args: CliArgs = {
    foreground: false,
    readonly: false,
    exportName: "",
    single: false,
    exitWithParent: false,
    threads: DEFAULT_THREADS,
    noSr: false,
    noMc: false,
    tls: "off",
    tlsVerifyPeer: false,
    printUri: false,
    verbose: false,
    log: "stderr",
    dumpConfig: false,
    dumpPlugin: false,
    help: false,
    version: false,
    params: [],
  };
  const words: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--") {
      words.push(...argv.slice(i + 1));
      break;
    }
    if (a.startsWith("--")) {
      const eq = a.indexOf("=");
      const name = eq >= 0 ? a.slice(2, eq) : a.slice(2);
      if (name in UNSUPPORTED) throw new UsageError(`--${name}: ${UNSUPPORTED[name]}`);
      const spec = LONG[name];
      if (!spec) throw new UsageError(`unrecognized option '--${name}'`);
      let value: string | undefined;
      if (spec.arg) {
        if (eq >= 0) value = a.slice(eq + 1);
        else if (i + 1 < argv.length) value = argv[++i];
        else throw new UsageError(`option '--${name}' requires an argument`);
      } else if (eq >= 0) {
        throw new UsageError(`option '--${name}' doesn't allow an argument`);
      }
      apply(args, `--${name}`, spec, value);
    } else if (a.startsWith("-") && a.length > 1) {
      for (let j = 1; j < a.length; j++) {
        const c = a[j];
        if (c in UNSUPPORTED) throw new UsageError(`-${c}: ${UNSUPPORTED[c]}`);
        const long = SHORT[c];
        if (!long) throw new UsageError(`invalid option -- '${c}'`);
        const spec = LONG[long];
        if (spec.arg) {
          let value = a.slice(j + 1);
          if (value === "") {
            if (i + 1 >= argv.length) throw new UsageError(`option requires an argument -- '${c}'`);
            value = argv[++i];
          }
          apply(args, `-${c}`, spec, value);
          break;
        }
        apply(args, `-${c}`, spec, undefined);
      }
    } else {
      words.push(a);
    }
  }
  if (words.length > 0) {
    args.plugin = words[0];
    for (const w of words.slice(1)) {
      const eq = w.indexOf("=");
      if (eq > 0 && KEY.test(w.slice(0, eq))) {
        args.params.push({ key: w.slice(0, eq), value: w.slice(eq + 1) });
      } else {
        args.params.push({ key: null, value: w });
      }
    }
  }
  return args;
}

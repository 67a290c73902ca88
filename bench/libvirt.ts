/**
 * nbdcopy of a raw guest disk to `null:` through our libvirt plugin and
 * through nbdkit's (C), on the same domain, in the same run, alternating.
 *
 * ```
 * deno run -A bench/libvirt.ts [--rounds=5] [--size=1024] [--requests=256K] [--runtime=deno]
 *                               [--connect=local|tcp|ssh]
 * ```
 *
 * `--runtime=bun` or `--runtime=node` (the npm build: `deno task build:npm`
 * first) runs our server on that runtime; `NBDKIT_TS_CMD` (a JSON array)
 * overrides the command altogether.
 *
 * `--connect` picks the libvirt URI that both servers and the ceiling use:
 * `local` (the default) is `qemu:///system`; `tcp` is `qemu+tcp://` to a
 * second libvirtd listening on loopback; `ssh` is `qemu+ssh://root@127.0.0.1`
 * through an sshd of its own on loopback (the tests' helpers start both). A
 * remote URI adds a transport on the same two cores (ssh's encryption, or
 * TCP), so the CPU budget, which does not count it, is printed for `local`
 * only.
 *
 * `--size` is in MiB. Each round starts both servers on Unix sockets and
 * times nbdcopy alone (server start-up excluded), then reads the CPU time
 * the server and libvirtd spent. Prints every round, the medians and the
 * throughput ratio (ours / nbdkit's).
 *
 * Each round also times the ceiling: bench/peek_ceiling.c (built with gcc and
 * libvirt's headers, libvirt-dev) peeks the same disk with no NBD server and
 * no client at all. No server can be faster than that; when the ceiling is
 * slower than half nbdkit's time, the 2× target is out of reach on the machine.
 *
 * Each round also times the floor: the ceiling and, at the same time, an
 * nbdcopy of the same size from `nbdkit null` (with `--no-extents`, so that
 * every byte is read), a server whose reads only zero the reply. A server
 * through libvirt has to do both pieces of work, on the same cores, so no
 * server can take much less time than the two together (at most the zeroing,
 * about 0.05 CPU-s per GiB): when the floor is slower than half nbdkit's
 * time, the 2× target is out of the machine's reach, however the server
 * overlaps them.
 *
 * The CPU budget says the same in CPU seconds: at the 2× target's time the
 * machine's cores offer so many; the work no server can avoid is libvirtd's
 * (during the ceiling), libvirt's client library's (the ceiling process
 * itself) and nbdcopy's (as measured beside nbdkit). What is left is all a
 * server may spend, with perfect overlap, on its NBD side.
 *
 * @module
 */
import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { existsSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO } from "../tests/helpers.ts";
import {
  must,
  type RemoteLibvirtd,
  setupLibvirt,
  type Sshd,
  startRemoteLibvirtd,
  startSshd,
} from "../tests/libvirt_env.ts";

const args = Object.fromEntries(
  process.argv.slice(2).map((a) => a.replace(/^--/, "").split("=", 2) as [string, string]),
);
const rounds = Number(args.rounds ?? 5);
const sizeMiB = Number(args.size ?? 1024);
const requestSize = args.requests ?? "";
const runtime = args.runtime ?? "deno";
const transport = args.connect ?? "local";
if (!["local", "tcp", "ssh"].includes(transport)) {
  throw new Error(`--connect=${transport}: one of local, tcp, ssh`);
}
const BIN = join(REPO, "node_modules", ".bin");
const commands: Record<string, string[]> = {
  deno: [join(BIN, "deno"), "run", "-A", "--no-check", join(REPO, "cli.ts")],
  bun: [join(BIN, "bun"), join(REPO, "cli.ts")],
  node: ["node", join(REPO, "npm", "dist", "esm", "cli.js")],
};
const ours = process.env.NBDKIT_TS_CMD ? JSON.parse(process.env.NBDKIT_TS_CMD) : commands[runtime];
if (!ours) throw new Error(`--runtime=${runtime}: one of ${Object.keys(commands).join(", ")}`);
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH ?? ""}` };

/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, "utf8").split(") ")[1].split(" ");
  return (Number(fields[11]) + Number(fields[12])) / 100;
}

/** The libvirt URI of this run; set once the remote daemon or sshd is up. */
let uri = "qemu:///system";
/** The daemon that serves `uri`'s peeks: the system one, or the second one for `tcp`. */
let remoteDaemon: RemoteLibvirtd | undefined;

function libvirtdPid(): number {
  if (remoteDaemon) return remoteDaemon.pid;
  return Number(must("pgrep", ["-xo", "libvirtd"]).trim());
}

/** Build bench/peek_ceiling.c; null (and why on stderr) when it cannot be built. */
function buildCeiling(): string | null {
  const exe = join(tmpdir(), `nbdkit-ts-peek-ceiling-${process.pid}`);
  const r = spawnSync("gcc", [
    "-O2",
    "-o",
    exe,
    join(REPO, "bench", "peek_ceiling.c"),
    "-lvirt",
    "-lpthread",
  ], { env: ENV, encoding: "utf8" });
  if (r.status === 0) return exe;
  console.error(
    `no ceiling: gcc with libvirt-dev is needed (${(r.stderr ?? r.error ?? "").toString().trim()})`,
  );
  return null;
}

/** Peeks of 1 MiB from 4 threads: the fastest of the shapes tried (1–8 threads, 1 or 4 MiB). */
const CEILING_THREADS = 4;
const CEILING_PEEK = 1 << 20;

/** `argv` run under /usr/bin/time: its stdout and the CPU seconds (user + system) it used. */
function timed(argv: string[]): { status: number | null; stdout: string; cpu: number } {
  const file = join(tmpdir(), `nbdkit-ts-bench-time-${process.pid}`);
  const r = spawnSync("/usr/bin/time", ["-f", "%U %S", "-o", file, ...argv], {
    env: ENV,
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  const [user, sys] = readFileSync(file, "utf8").trim().split("\n").at(-1)!.split(" ").map(Number);
  rmSync(file, { force: true });
  return { status: r.status, stdout: r.stdout, cpu: user + sys };
}

/** The ceiling's time, its own CPU (libvirt's client library) and libvirtd's meanwhile. */
interface Ceiling {
  seconds: number;
  clientCpu: number;
  libvirtdCpu: number;
}

/** The ceiling's command line: the whole of disk sda of `domain`. */
function ceilingArgv(exe: string, domain: string): string[] {
  const size = String(sizeMiB * 1024 * 1024);
  return [
    exe,
    uri,
    domain,
    "sda",
    size,
    String(CEILING_THREADS),
    String(CEILING_PEEK),
  ];
}

/** Peek the whole disk with `exe`, no NBD involved. */
function ceiling(exe: string, domain: string): Ceiling {
  const lv = libvirtdPid();
  const lvBefore = cpuSeconds(lv);
  const r = timed(ceilingArgv(exe, domain));
  if (r.status !== 0) throw new Error(`${exe} failed with status ${r.status}`);
  return {
    seconds: Number(r.stdout.trim()),
    clientCpu: r.cpu,
    libvirtdCpu: cpuSeconds(lv) - lvBefore,
  };
}

/** Wait (up to 30 s) until `child`, a server called `what`, listens on `socket`. */
async function listening(socket: string, child: ChildProcess, what: string): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!existsSync(socket)) {
    if (Date.now() > deadline || child.exitCode !== null) throw new Error(`${what} did not start`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The ceiling and an nbdcopy from `socket` (nbdkit null) at once: seconds until both end. */
async function floor(exe: string, domain: string, socket: string): Promise<number> {
  const run = (argv: string[]) =>
    new Promise<void>((resolve, reject) => {
      const child = spawn(argv[0], argv.slice(1), {
        env: ENV,
        stdio: ["ignore", "ignore", "inherit"],
      });
      child.on("error", reject);
      child.on("close", (status) =>
        status === 0 ? resolve() : reject(new Error(`${argv[0]} failed with status ${status}`)));
    });
  const t0 = performance.now();
  await Promise.all([
    run(ceilingArgv(exe, domain)),
    run(["nbdcopy", "--no-extents", `nbd+unix:///?socket=${socket}`, "null:"]),
  ]);
  return (performance.now() - t0) / 1000;
}

/** Start `nbdkit null` of the disk's size on a Unix socket, for the floor. */
async function startNull(): Promise<{ socket: string; stop(): Promise<void> }> {
  const socket = join(tmpdir(), `nbdkit-ts-bench-null-${process.pid}.sock`);
  const child = spawn("nbdkit", ["-f", "-U", socket, "null", `${sizeMiB}M`], {
    env: ENV,
    stdio: ["ignore", "ignore", "inherit"],
  });
  const exited = new Promise((resolve) => child.on("close", resolve));
  await listening(socket, child, "nbdkit null");
  return {
    socket,
    async stop() {
      child.kill("SIGTERM");
      await exited;
      rmSync(socket, { force: true });
    },
  };
}

interface Sample {
  seconds: number;
  serverCpu: number;
  libvirtdCpu: number;
  nbdcopyCpu: number;
  /** The server's peak resident set (VmHWM), MiB. */
  peakMiB: number;
}

/** Peak resident set of a process so far, MiB. */
function peakMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  return Number(/^VmHWM:\s+(\d+)/m.exec(status)?.[1] ?? 0) / 1024;
}

/** Start `program` serving `params` on a socket, time one nbdcopy from it, stop it. */
async function measure(program: string[], params: string[]): Promise<Sample> {
  const socket = join(tmpdir(), `nbdkit-ts-bench-${process.pid}-${Date.now()}.sock`);
  const child = spawn(program[0], [...program.slice(1), "-f", "-U", socket, ...params], {
    env: ENV,
    stdio: ["ignore", "ignore", "inherit"],
  });
  const exited = new Promise((resolve) => child.on("close", resolve));
  try {
    await listening(socket, child, program.join(" "));
    const lv = libvirtdPid();
    const lvBefore = cpuSeconds(lv);
    const srvBefore = cpuSeconds(child.pid!);
    const t0 = performance.now();
    const extra = requestSize ? [`--request-size=${requestSize}`] : [];
    const r = timed(["nbdcopy", ...extra, `nbd+unix:///?socket=${socket}`, "null:"]);
    const seconds = (performance.now() - t0) / 1000;
    if (r.status !== 0) throw new Error(`nbdcopy failed with status ${r.status}`);
    return {
      seconds,
      serverCpu: cpuSeconds(child.pid!) - srvBefore,
      libvirtdCpu: cpuSeconds(lv) - lvBefore,
      nbdcopyCpu: r.cpu,
      peakMiB: peakMiB(child.pid!),
    };
  } finally {
    child.kill("SIGTERM");
    await exited;
    rmSync(socket, { force: true });
  }
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

const env = await setupLibvirt({ bigSize: sizeMiB * 1024 * 1024, extraDisks: false });
let sshd: Sshd | undefined;
const ceilingExe = buildCeiling();
let nullServer: Awaited<ReturnType<typeof startNull>> | undefined;
try {
  // Started inside the try, so that the domain goes away if they fail.
  if (transport === "tcp") uri = (remoteDaemon = await startRemoteLibvirtd()).uri;
  if (transport === "ssh") uri = (sshd = await startSshd()).uri;
  if (ceilingExe) nullServer = await startNull();
  const params = ["libvirt", `connect=${uri}`, `domain=${env.domain}`, "disk=sda"];
  const programs = { ours, nbdkit: ["nbdkit"] };
  const cores = must("nproc", []).trim();
  console.log(
    `nbdcopy of a ${sizeMiB} MiB raw guest disk to null:, ${rounds} rounds, ${cores} cores, ` +
      `ours on ${runtime}${requestSize ? `, --request-size=${requestSize}` : ""}, ` +
      `libvirt ${uri.replace(/\?.*/, "")}`,
  );
  const results: Record<"ours" | "nbdkit", Sample[]> = { ours: [], nbdkit: [] };
  const ceilings: Ceiling[] = [];
  const floors: number[] = [];
  for (let i = 0; i < rounds; i++) {
    if (ceilingExe) {
      const c = ceiling(ceilingExe, env.domain);
      ceilings.push(c);
      console.log(
        `  round ${i + 1} ceiling ${c.seconds.toFixed(2)} s  ${
          (sizeMiB / c.seconds).toFixed(0).padStart(5)
        } MiB/s  client cpu ${c.clientCpu.toFixed(2)} s  libvirtd cpu ${
          c.libvirtdCpu.toFixed(2)
        } s  (virDomainBlockPeek alone, ${CEILING_THREADS} threads, no NBD)`,
      );
      const f = await floor(ceilingExe, env.domain, nullServer!.socket);
      floors.push(f);
      console.log(
        `  round ${i + 1} floor   ${f.toFixed(2)} s  ${
          (sizeMiB / f).toFixed(0).padStart(5)
        } MiB/s  (the ceiling and an nbdcopy from nbdkit null, at once)`,
      );
    }
    for (const name of ["ours", "nbdkit"] as const) {
      const s = await measure(programs[name], params);
      results[name].push(s);
      console.log(
        `  round ${i + 1} ${name.padEnd(6)} ${s.seconds.toFixed(2)} s  ` +
          `${(sizeMiB / s.seconds).toFixed(0).padStart(5)} MiB/s  ` +
          `server cpu ${s.serverCpu.toFixed(2)} s  libvirtd cpu ${s.libvirtdCpu.toFixed(2)} s  ` +
          `nbdcopy cpu ${s.nbdcopyCpu.toFixed(2)} s  server peak RSS ${s.peakMiB.toFixed(0)} MiB`,
      );
    }
  }
  const of = (name: "ours" | "nbdkit", key: keyof Sample) =>
    median(results[name].map((s) => s[key]));
  const o = of("ours", "seconds");
  const t = of("nbdkit", "seconds");
  for (const name of ["ours", "nbdkit"] as const) {
    const m = of(name, "seconds");
    console.log(
      `median ${name.padEnd(6)} ${m.toFixed(2)} s  ${(sizeMiB / m).toFixed(0)} MiB/s  server cpu ${
        of(name, "serverCpu").toFixed(2)
      } s  peak RSS ${of(name, "peakMiB").toFixed(0)} MiB`,
    );
  }
  console.log(`throughput ratio ours/nbdkit: ${(t / o).toFixed(2)}x`);
  if (ceilingExe) {
    const c = median(ceilings.map((x) => x.seconds));
    console.log(
      `median ceiling ${c.toFixed(2)} s  ${(sizeMiB / c).toFixed(0)} MiB/s (peeks alone)`,
    );
    console.log(
      `ceiling ratio (no server, no client)/nbdkit: ${(t / c).toFixed(2)}x; ` +
        `the 2x target needs ${(t / 2).toFixed(2)} s`,
    );
    const f = median(floors);
    console.log(
      `median floor ${f.toFixed(2)} s  ${
        (sizeMiB / f).toFixed(0)
      } MiB/s (peeks and a copy at once)`,
    );
    console.log(
      `floor ratio (peeks and serving at once)/nbdkit: ${(t / f).toFixed(2)}x; ` +
        `the 2x target is ${t / f >= 2 ? "within" : "beyond"} this machine's reach in this run`,
    );
    if (transport !== "local") {
      console.log(`no cpu budget: the ${transport} transport's own cpu is not counted in it`);
    } else {
      const daemon = median(ceilings.map((x) => x.libvirtdCpu));
      const client = median(ceilings.map((x) => x.clientCpu));
      const copy = of("nbdkit", "nbdcopyCpu");
      const budget = Number(cores) * t / 2;
      const fixed = daemon + client + copy;
      console.log(
        `cpu budget at the 2x time: ${cores} cores x ${(t / 2).toFixed(2)} s = ${
          budget.toFixed(2)
        } cpu-s; unavoidable: libvirtd ${daemon.toFixed(2)} + libvirt client ${
          client.toFixed(2)
        } + nbdcopy ${copy.toFixed(2)} = ${fixed.toFixed(2)}; left for a server's NBD side: ${
          (budget - fixed).toFixed(2)
        } cpu-s (ours spends about ${(of("ours", "serverCpu") - client).toFixed(2)}, nbdkit ${
          (of("nbdkit", "serverCpu") - client).toFixed(2)
        })`,
      );
    }
  }
} finally {
  await nullServer?.stop();
  if (ceilingExe) rmSync(ceilingExe, { force: true });
  await sshd?.cleanup();
  await remoteDaemon?.cleanup();
  env.cleanup();
}

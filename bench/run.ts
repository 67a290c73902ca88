/**
 * Side-by-side benchmarks: our server under Deno, Bun and Node against
 * nbdkit 1.32, in the same run, on the same data. Prints a table of medians
 * and ratios, writes bench/RESULTS.md and bench/chart.svg.
 *
 * ```sh
 * deno task bench            # everything (about 40 minutes)
 * deno task bench --quick    # one repetition, shorter runs
 * deno task bench --only=fio # just the fio jobs
 * ```
 *
 * The streaming and libvirt comparisons are their own scripts
 * (bench/streaming.sh, bench/libvirt.ts); this harness runs them on each
 * runtime (streaming also at 256 MiB and 4 GiB on Deno) and copies their
 * output into RESULTS.md, followed by bench/BOUNDS.md: what bounds the
 * targets not reached, written by hand from these measurements.
 *
 * Needs what `.ci/setup` installs (fio, nbdkit, qemu-utils, libnbd-bin,
 * libvirtd) and, for the libvirt ceiling, gcc and libvirt-dev (without
 * them that one line is left out).
 *
 * @module
 */
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { cpus, tmpdir, totalmem } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { renderChart } from "./chart.ts";

const ROOT = join(dirname(fileURLToPath(import.meta.url)), "..");
const BIN = join(ROOT, "node_modules", ".bin");
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:${process.env.PATH}` };

const args = new Set(process.argv.slice(2));
const quick = args.has("--quick");
const only = [...args].find((a) => a.startsWith("--only="))?.slice(7);
const REPS = quick ? 1 : 5;
const SECONDS = quick ? 2 : 5;

/** A server under test: how to start it with a plugin and parameters. */
interface Contender {
  name: string;
  argv: (plugin: string[], socket: string) => string[];
}

const contenders: Contender[] = [
  { name: "nbdkit", argv: (p, s) => ["nbdkit", "-f", "-U", s, ...p] },
  {
    name: "ours/deno",
    argv: (p, s) => [join(BIN, "deno"), "run", "-A", join(ROOT, "cli.ts"), "-f", "-U", s, ...p],
  },
  {
    name: "ours/bun",
    argv: (p, s) => [join(BIN, "bun"), join(ROOT, "cli.ts"), "-f", "-U", s, ...p],
  },
];
// Node runs the npm build, made afresh so that it is the code under test.
const built = spawnSync(join(BIN, "deno"), ["run", "-A", join(ROOT, "npm", "build.ts")], {
  env: ENV,
  stdio: ["ignore", "ignore", "inherit"],
});
if (built.status !== 0) throw new Error("npm/build.ts failed: Node cannot be measured");
const nodeCli = join(ROOT, "npm", "dist", "esm", "cli.js");
contenders.push({ name: "ours/node", argv: (p, s) => ["node", nodeCli, "-f", "-U", s, ...p] });

/** A running server. */
interface Running {
  pid: number;
  uri: string;
  stop(): Promise<void>;
}

async function start(c: Contender, plugin: string[]): Promise<Running> {
  const dir = mkdtempSync(join(tmpdir(), "nbdkit-ts-bench-"));
  const socket = join(dir, "sock");
  const [cmd, ...rest] = c.argv(plugin, socket);
  const child = spawn(cmd, rest, { env: ENV, stdio: ["ignore", "ignore", "inherit"] });
  for (let i = 0; i < 300 && !existsSync(socket); i++) await sleep(50);
  if (!existsSync(socket)) throw new Error(`${c.name} did not start`);
  const exited = new Promise<void>((r) => child.on("close", () => r()));
  return {
    pid: child.pid!,
    uri: `nbd+unix:///?socket=${socket}`,
    async stop() {
      child.kill("SIGTERM");
      await exited;
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

function sleep(ms: number): Promise<void> {
  return new Promise((r) => setTimeout(r, ms));
}

/** Resident set sizes of a process, in MiB: current and peak. */
function rss(pid: number): { now: number; peak: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kb = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, "m").exec(status)?.[1] ?? 0);
  return { now: kb("VmRSS") / 1024, peak: kb("VmHWM") / 1024 };
}

/** One fio job's results. */
interface FioResult {
  mibps: number;
  iops: number;
  p99us: number;
}

function fio(uri: string, job: FioJob, jobs = 1): FioResult {
  const out = join(tmpdir(), `nbdkit-ts-fio-${process.pid}.json`);
  const r = spawnSync("fio", [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.qd}`,
    `--numjobs=${jobs}`,
    "--group_reporting",
    `--runtime=${SECONDS}`,
    "--time_based",
    "--size=1G",
    "--output-format=json",
    `--output=${out}`,
  ], { env: ENV, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const data = JSON.parse(readFileSync(out, "utf8"));
  rmSync(out, { force: true });
  const side = job.rw.includes("write") ? data.jobs[0].write : data.jobs[0].read;
  return {
    mibps: side.bw / 1024,
    iops: side.iops,
    p99us: (side.clat_ns.percentile["99.000000"] ?? 0) / 1000,
  };
}

/** Write 1 GiB sequentially at `offset`. */
function fill(uri: string, offset = "0"): void {
  spawnSync("fio", [
    "--name=fill",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=write",
    "--bs=1M",
    "--iodepth=4",
    "--size=1G",
    `--offset=${offset}`,
  ], { env: ENV });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

interface FioJob {
  label: string;
  rw: string;
  bs: string;
  qd: number;
  metric: "mibps" | "iops";
}

const JOBS: FioJob[] = [
  { label: "1 MiB seq read QD4", rw: "read", bs: "1M", qd: 4, metric: "mibps" },
  { label: "4 KiB rand read QD16", rw: "randread", bs: "4k", qd: 16, metric: "iops" },
  { label: "4 KiB rand write QD16", rw: "randwrite", bs: "4k", qd: 16, metric: "iops" },
];

/** One row of the results: a measurement for each contender. */
export interface Row {
  label: string;
  unit: string;
  higherIsBetter: boolean;
  values: Record<string, number>;
  extra?: Record<string, string>;
}

const rows: Row[] = [];

function show(row: Row): void {
  const peer = row.values["nbdkit"];
  const cells = Object.entries(row.values).map(([name, v]) => {
    const ratio = name === "nbdkit" || !peer ? "" : ` (${(v / peer).toFixed(2)}×)`;
    return `${name}=${v.toFixed(v >= 100 ? 0 : 1)}${ratio}`;
  });
  console.log(`${row.label} [${row.unit}]: ${cells.join("  ")}`);
}

async function fioBenchmarks(): Promise<void> {
  for (const job of JOBS) {
    for (const conns of [1, 4, 16]) { // how cost grows with connections
      const row: Row = {
        label: conns === 1 ? job.label : `${job.label}, ${conns} connections`,
        unit: job.metric === "mibps" ? "MiB/s" : "IOPS",
        higherIsBetter: true,
        values: {},
        extra: {},
      };
      // Every server up at once, and the repetitions taken in turns, so that
      // the machine's drift over the minutes of a run hits each alike.
      const servers = [];
      const results = new Map<string, FioResult[]>();
      try {
        for (const c of contenders) {
          const server = await start(c, ["memory", "size=1G"]);
          servers.push({ c, server });
          fill(server.uri); // so that reads copy real pages, not holes
          results.set(c.name, []);
        }
        for (let i = 0; i < REPS; i++) {
          for (const { c, server } of servers) {
            results.get(c.name)!.push(fio(server.uri, job, conns));
          }
        }
      } finally {
        for (const { server } of servers) await server.stop();
      }
      const p99: Record<string, number> = {};
      for (const [name, rs] of results) {
        row.values[name] = median(rs.map((r) => r[job.metric]));
        p99[name] = median(rs.map((r) => r.p99us));
      }
      row.extra!["p99 latency (µs)"] = Object.entries(p99).map(([n, v]) => `${n} ${v.toFixed(0)}`)
        .join(", ");
      rows.push(row);
      show(row);
    }
  }
}

async function memoryBenchmarks(): Promise<void> {
  const peak: Row = {
    label: "peak RSS, 4 KiB random writes over a 1 GiB memory disk",
    unit: "MiB",
    higherIsBetter: false,
    values: {},
  };
  const sparse: Row = {
    label: "RSS after writing 1 GiB into a 64 GiB memory disk",
    unit: "MiB",
    higherIsBetter: false,
    values: {},
  };
  for (const c of contenders) {
    let server = await start(c, ["memory", "size=1G"]);
    try {
      fio(server.uri, { label: "", rw: "randwrite", bs: "4k", qd: 16, metric: "iops" });
      peak.values[c.name] = rss(server.pid).peak;
    } finally {
      await server.stop();
    }
    // A fresh server: only the 1 GiB written may count.
    server = await start(c, ["memory", "size=64G"]);
    try {
      fill(server.uri, "32G");
      sparse.values[c.name] = rss(server.pid).now;
    } finally {
      await server.stop();
    }
  }
  rows.push(peak, sparse);
  show(peak);
  show(sparse);
}

/** Run one of the plugin benchmarks (its own script) and return what it printed. */
function script(name: string, argv: string[], env: Record<string, string> = {}): string | null {
  if (!existsSync(join(ROOT, "bench", name))) return null;
  console.log(`\n# ${name} ${Object.entries(env).map(([k, v]) => `${k}=${v}`).join(" ")}`);
  const r = spawnSync(argv[0], argv.slice(1), {
    env: { ...ENV, ...env },
    encoding: "utf8",
    stdio: ["ignore", "pipe", "inherit"],
  });
  process.stdout.write(r.stdout);
  return r.stdout;
}

function machine(): string {
  const cpu = cpus()[0]?.model ?? "unknown CPU";
  const versions = [
    spawnSync("nbdkit", ["--version"], { encoding: "utf8" }).stdout.trim(),
    `deno ${
      spawnSync(join(BIN, "deno"), ["--version"], { encoding: "utf8" }).stdout.split(" ")[1]
    }`,
    `bun ${spawnSync(join(BIN, "bun"), ["--version"], { encoding: "utf8" }).stdout.trim()}`,
    `node ${spawnSync("node", ["--version"], { encoding: "utf8" }).stdout.trim().slice(1)}`,
    spawnSync("fio", ["--version"], { encoding: "utf8" }).stdout.trim(),
  ];
  return `${cpus().length} × ${cpu}, ${(totalmem() / 2 ** 30).toFixed(0)} GiB; ${
    versions.join(", ")
  }`;
}

function markdown(extraSections: string[]): string {
  const names = contenders.map((c) => c.name);
  const lines = [
    "# Benchmark results",
    "",
    `Date: ${new Date().toISOString().slice(0, 10)}. Machine: ${machine()}.`,
    "",
    `Command: \`deno task bench${
      quick ? " --quick" : ""
    }\` — each figure is the median of ${REPS} run(s) of ${SECONDS} s;`,
    "our server and nbdkit run the same jobs in the same run, over a Unix socket, memory plugin.",
    "Ratios are ours ÷ nbdkit's (above 1 is better for throughput, below 1 is better for memory).",
    "",
    `| job | unit | ${names.join(" | ")} | ${
      names.slice(1).map((n) => `${n} ratio`).join(" | ")
    } |`,
    `| --- | --- | ${names.map(() => "---:").join(" | ")} | ${
      names.slice(1).map(() => "---:").join(" | ")
    } |`,
  ];
  for (const row of rows) {
    const peer = row.values["nbdkit"];
    lines.push(
      `| ${row.label} | ${row.unit} | ${
        names.map((n) => (row.values[n] ?? NaN).toFixed(0)).join(" | ")
      } | ${
        names.slice(1).map((n) => peer ? `${(row.values[n] / peer).toFixed(2)}×` : "").join(" | ")
      } |`,
    );
  }
  const lat = rows.filter((r) => r.extra?.["p99 latency (µs)"]);
  if (lat.length) {
    lines.push("", "p99 completion latency (µs):", "");
    for (const r of lat) lines.push(`- ${r.label}: ${r.extra!["p99 latency (µs)"]}`);
  }
  lines.push("", "![ours vs nbdkit](chart.svg)", "", ...extraSections);
  return lines.join("\n") + "\n";
}

if (!only || only === "fio") await fioBenchmarks();
if (!only || only === "memory") await memoryBenchmarks();
const extra: string[] = [];
/** One of the plugin benchmarks: its own script, on one runtime. */
interface PluginBench {
  title: string;
  script: string;
  argv: string[];
  env: Record<string, string>;
  runtime: string;
  /** The chart's label for its ratio, and how to read the ratio from the script's output. */
  chart: { label: string; higherIsBetter: boolean; ratio: RegExp };
}

const streaming = (size: string, runtime: string): PluginBench => ({
  title: `streaming ${size} (${runtime})`,
  script: "streaming.sh",
  argv: ["bash", join(ROOT, "bench", "streaming.sh"), String(REPS)],
  env: { RUNTIME: runtime, SIZE: size },
  runtime,
  chart: {
    label: `streaming ${size}iB → sha256sum, time ÷ nbdcopy's`,
    higherIsBetter: false,
    ratio: /ratio ([\d.]+)/,
  },
});
const libvirt = (runtime: string): PluginBench => ({
  title: `libvirt (${runtime})`,
  script: "libvirt.ts",
  argv: [
    join(BIN, "deno"),
    "run",
    "-A",
    join(ROOT, "bench", "libvirt.ts"),
    `--rounds=${REPS}`,
    `--runtime=${runtime}`,
  ],
  env: {},
  runtime,
  chart: {
    label: "libvirt, nbdcopy of 1 GiB: throughput ÷ nbdkit's",
    higherIsBetter: true,
    ratio: /throughput ratio ours\/nbdkit: ([\d.]+)x/,
  },
});
const plugins = [
  streaming("1G", "deno"),
  streaming("1G", "bun"),
  streaming("1G", "node"),
  // How cost grows with the stream's length (memory must not).
  streaming("256M", "deno"),
  streaming("4G", "deno"),
  libvirt("deno"),
  libvirt("bun"),
  libvirt("node"),
];
// The chart shows these as ratios to their own peer (each run has its own):
// the peer's value is 1.
const ratioRows = new Map<string, Row>();
for (const b of plugins) {
  if (only && !b.script.startsWith(only)) continue;
  const out = script(b.script, b.argv, b.env);
  if (out === null) continue;
  extra.push(`## ${b.title}`, "", "```", out.trim(), "```", "");
  const ratio = Number(b.chart.ratio.exec(out)?.[1]);
  if (!ratio) continue;
  let row = ratioRows.get(b.chart.label);
  if (!row) {
    row = {
      label: b.chart.label,
      unit: "×",
      higherIsBetter: b.chart.higherIsBetter,
      values: { nbdkit: 1 },
    };
    ratioRows.set(b.chart.label, row);
  }
  row.values[`ours/${b.runtime}`] = ratio;
}
// What bounds the targets not reached: measured by hand, kept beside the script.
const bounds = join(ROOT, "bench", "BOUNDS.md");
if (existsSync(bounds)) extra.push(readFileSync(bounds, "utf8").trim(), "");
if (!only) {
  writeFileSync(join(ROOT, "bench", "RESULTS.md"), markdown(extra));
  writeFileSync(
    join(ROOT, "bench", "chart.svg"),
    renderChart([...rows, ...ratioRows.values()], contenders.map((c) => c.name)),
  );
  console.log("\nwrote bench/RESULTS.md and bench/chart.svg");
}

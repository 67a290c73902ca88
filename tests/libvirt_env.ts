/**
 * A real libvirt for the libvirt plugin's tests and benchmark: the system
 * `libvirtd` (started if it is not running), raw and qcow2 disk files of
 * known random content, a defined (never started) domain using them, and on
 * request a second `libvirtd` listening on loopback TCP and on a Unix socket
 * of its own, and an `sshd` on loopback, for remote URIs.
 *
 * Needs root and Debian's libvirt-daemon-system, libvirt-daemon-driver-qemu,
 * libvirt-clients (virsh) and qemu-utils (design.md §5). Tests use `node:`
 * built-ins only, so this runs under Deno, Bun and Node alike.
 *
 * The second daemon runs in its own mount namespace with a private
 * `/run/libvirt`: two libvirtd processes otherwise fight over the drivers'
 * pid files there. It reads the same `/etc/libvirt` (so it knows the test
 * domain, defined before it starts) and must not be used to start guests.
 *
 * @module
 */
import { spawn, spawnSync } from "node:child_process";
import { createHash, randomFillSync } from "node:crypto";
import {
  chmodSync,
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  writeFileSync,
  writeSync,
} from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

const SYSTEM_URI = "qemu:///system";
/** Readable by the `libvirt-qemu` user, as qemu's images must be. */
const IMAGES = "/var/lib/libvirt/images";
const ENV = { ...process.env, PATH: `/usr/bin:/usr/sbin:/bin:/sbin:${process.env.PATH ?? ""}` };

/** One disk file of the test domain. */
export interface DiskFile {
  /** Its target in the domain ("sda"). */
  target: string;
  /** Its path on the host. */
  path: string;
  /** Its image format. */
  format: "raw" | "qcow2";
  /** The size the guest sees, in bytes. */
  size: number;
  /** SHA-256 of the guest-visible bytes (of the file itself for raw disks). */
  sha256: string;
}

/** The test domain and its disks. */
export interface LibvirtEnv {
  /** The domain's name (unique per run). */
  domain: string;
  /** The folder of the disk files. */
  dir: string;
  /** The disks, in the domain's order. */
  disks: DiskFile[];
  /** A disk by target. */
  disk(target: string): DiskFile;
  /** Undefine the domain and remove its files. */
  cleanup(): void;
}

/** Options of {@linkcode setupLibvirt}. */
export interface LibvirtEnvOptions {
  /** Size of the large raw disk `sda` (default 256 MiB). */
  bigSize?: number;
  /** Add the small raw disk `sdb` and the qcow2 disk `sdc` (default true). */
  extraDisks?: boolean;
  /** Add a raw disk `sdd` holding an ext4 filesystem with a file `/hello.txt` (default false). */
  fsDisk?: boolean;
}

/** Run a command; throw with its stderr when it fails. */
export function must(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { env: ENV, encoding: "utf8" });
  if (r.error) throw r.error;
  if (r.status !== 0) {
    throw new Error(`${cmd} ${args.join(" ")}: exit ${r.status}: ${r.stderr.trim()}`);
  }
  return r.stdout;
}

function answers(uri: string): boolean {
  const r = spawnSync("virsh", ["-c", uri, "version"], { env: ENV, encoding: "utf8" });
  return r.status === 0;
}

async function waitFor(what: string, ok: () => boolean, ms = 30_000): Promise<void> {
  const deadline = Date.now() + ms;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Make sure the system libvirtd answers on `qemu:///system`, starting it
 * (`libvirtd -d`) if needed. A daemon started here is left running.
 */
export async function ensureLibvirtd(): Promise<void> {
  if (answers(SYSTEM_URI)) return;
  must("libvirtd", ["-d"]);
  await waitFor("libvirtd to answer on qemu:///system", () => answers(SYSTEM_URI));
}

/** Write `size` random bytes to `path`; returns their SHA-256. */
function writeRandom(path: string, size: number): string {
  const fd = openSync(path, "w", 0o644);
  const hash = createHash("sha256");
  const chunk = new Uint8Array(4 * 1024 * 1024);
  try {
    for (let done = 0; done < size;) {
      const n = Math.min(chunk.length, size - done);
      const piece = randomFillSync(chunk.subarray(0, n));
      hash.update(piece);
      for (let at = 0; at < n;) at += writeSync(fd, piece, at, n - at);
      done += n;
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest("hex");
}

function sha256File(path: string): string {
  return must("sha256sum", [path]).split(" ")[0];
}

function escapeXml(text: string): string {
  return text.replace(/&/g, "&amp;").replace(/'/g, "&apos;").replace(/</g, "&lt;");
}

/**
 * Create the disks and define the domain `nbdkit-ts-test-…` (not started).
 *
 * @param options Which disks.
 * @returns The environment; call `cleanup()` when done.
 */
export async function setupLibvirt(options: LibvirtEnvOptions = {}): Promise<LibvirtEnv> {
  await ensureLibvirtd();
  mkdirSync(IMAGES, { recursive: true });
  const dir = mkdtempSync(join(IMAGES, "nbdkit-ts-test-"));
  chmodSync(dir, 0o755);
  const domain = dir.slice(IMAGES.length + 1);
  const disks: DiskFile[] = [];
  const cleanup = () => {
    spawnSync("virsh", ["-c", SYSTEM_URI, "undefine", domain], { env: ENV });
    rmSync(dir, { recursive: true, force: true });
  };
  try {
    const bigSize = options.bigSize ?? 256 * 1024 * 1024;
    const sda = join(dir, "sda.raw");
    disks.push({
      target: "sda",
      path: sda,
      format: "raw",
      size: bigSize,
      sha256: writeRandom(sda, bigSize),
    });
    if (options.extraDisks ?? true) {
      // An odd size: 3 MiB and 512 bytes, not a multiple of any peek.
      const smallSize = 3 * 1024 * 1024 + 512;
      const sdb = join(dir, "sdb.raw");
      disks.push({
        target: "sdb",
        path: sdb,
        format: "raw",
        size: smallSize,
        sha256: writeRandom(sdb, smallSize),
      });
      const raw = join(dir, "sdc-content.raw");
      const content = writeRandom(raw, 1024 * 1024);
      const sdc = join(dir, "sdc.qcow2");
      must("qemu-img", ["convert", "-q", "-f", "raw", "-O", "qcow2", raw, sdc]);
      rmSync(raw);
      chmodSync(sdc, 0o644);
      disks.push({ target: "sdc", path: sdc, format: "qcow2", size: 1024 * 1024, sha256: content });
    }
    if (options.fsDisk) {
      const sdd = join(dir, "sdd.raw");
      must("truncate", ["-s", "64M", sdd]);
      const files = join(dir, "fs-content");
      mkdirSync(files);
      writeFileSync(join(files, "hello.txt"), "hello from nbdkit-ts\n");
      must("mkfs.ext4", ["-q", "-F", "-L", "nbdkit-ts", "-d", files, sdd]);
      rmSync(files, { recursive: true });
      chmodSync(sdd, 0o644);
      disks.push({
        target: "sdd",
        path: sdd,
        format: "raw",
        size: 64 * 1024 * 1024,
        sha256: sha256File(sdd),
      });
    }
    const xml = `<domain type='qemu'>
  <name>${domain}</name>
  <memory unit='MiB'>64</memory>
  <os><type arch='x86_64'>hvm</type></os>
  <devices>
${
      disks.map((d) =>
        `    <disk type='file' device='disk'><driver name='qemu' type='${d.format}'/>` +
        `<source file='${escapeXml(d.path)}'/><target dev='${d.target}' bus='sata'/></disk>`
      ).join("\n")
    }
  </devices>
</domain>
`;
    const xmlPath = join(dir, "domain.xml");
    writeFileSync(xmlPath, xml);
    must("virsh", ["-c", SYSTEM_URI, "define", xmlPath]);
  } catch (err) {
    cleanup();
    throw err;
  }
  return {
    domain,
    dir,
    disks,
    disk(target) {
      const d = disks.find((d) => d.target === target);
      if (!d) throw new Error(`No test disk '${target}'`);
      return d;
    },
    cleanup,
  };
}

/** A libvirtd listening on loopback TCP. */
export interface RemoteLibvirtd {
  /** `qemu+tcp://127.0.0.1:PORT/system`. */
  uri: string;
  /** Its Unix socket, for `qemu+unix:///system?socket=PATH`. */
  unixSocket: string;
  /** The daemon's process id. */
  pid: number;
  /** What the daemon logged. */
  log(): string;
  /** Stop it (SIGTERM) and wait until it has exited. */
  stop(): Promise<void>;
  /** Start it again on the same port (after `stop`). */
  restart(): Promise<void>;
  /** Stop it for good and remove its files. */
  cleanup(): Promise<void>;
}

/** A TCP port nobody listens on right now. */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => resolve(port));
    });
  });
}

/**
 * Start a second libvirtd with `--listen` on 127.0.0.1 (no TLS, no auth),
 * for `qemu+tcp://127.0.0.1:PORT/system`.
 *
 * @returns The daemon.
 */
export async function startRemoteLibvirtd(): Promise<RemoteLibvirtd> {
  await ensureLibvirtd();
  const dir = mkdtempSync(join(tmpdir(), "nbdkit-ts-libvirtd-"));
  const port = await freePort();
  const conf = join(dir, "libvirtd.conf");
  writeFileSync(
    conf,
    [
      "listen_tls = 0",
      "listen_tcp = 1",
      'auth_tcp = "none"',
      'listen_addr = "127.0.0.1"',
      `tcp_port = "${port}"`,
      `unix_sock_dir = "${dir}"`,
      "",
    ].join("\n"),
  );
  const uri = `qemu+tcp://127.0.0.1:${port}/system`;
  let log = "";
  let exited: Promise<void> = Promise.resolve();
  let pid = 0;
  const start = async () => {
    // A private /run/libvirt: the drivers' pid files there belong to the first daemon.
    const script = `mount -t tmpfs tmpfs /run/libvirt && exec libvirtd --listen -f "$1" -p "$2"`;
    const child = spawn(
      "unshare",
      ["-m", "--propagation", "private", "/bin/sh", "-c", script, "sh", conf, join(dir, "pid")],
      { env: ENV, stdio: ["ignore", "ignore", "pipe"] },
    );
    child.stderr!.setEncoding("utf8");
    child.stderr!.on("data", (d: string) => log += d);
    let alive = true;
    exited = new Promise((resolve) =>
      child.on("close", () => {
        alive = false;
        resolve();
      })
    );
    pid = child.pid!;
    try {
      await waitFor(`libvirtd --listen on ${uri}`, () => {
        if (!alive) throw new Error(`libvirtd --listen exited: ${log}`);
        return answers(uri);
      });
    } catch (err) {
      if (alive) child.kill("SIGKILL");
      throw err;
    }
  };
  const stop = async () => {
    try {
      process.kill(pid, "SIGTERM");
    } catch {
      // already gone
    }
    await exited;
  };
  await start();
  return {
    uri,
    unixSocket: join(dir, "libvirt-sock"),
    get pid() {
      return pid;
    },
    log: () => log,
    stop,
    restart: start,
    async cleanup() {
      await stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** An sshd on loopback that lets root in with a key of its own, for `qemu+ssh://`. */
export interface Sshd {
  /**
   * `qemu+ssh://root@127.0.0.1:PORT/system?…`: the system libvirtd through
   * this sshd, with the key, no prompt, and an ssh that neither reads nor
   * writes `~/.ssh/known_hosts`.
   */
  uri: string;
  /** What sshd logged. */
  log(): string;
  /** Stop it and remove its keys. */
  cleanup(): Promise<void>;
}

/**
 * Start Debian's sshd (openssh-server) on a free loopback port, with a host
 * key and an authorised client key made for it, in the foreground of a
 * child process. libvirt runs `virt-ssh-helper` (or `nc`) at the other end.
 *
 * @returns The daemon.
 */
export async function startSshd(): Promise<Sshd> {
  await ensureLibvirtd();
  const dir = mkdtempSync(join(tmpdir(), "nbdkit-ts-sshd-"));
  const port = await freePort();
  for (const key of ["host_key", "client_key"]) {
    must("ssh-keygen", ["-q", "-t", "ed25519", "-N", "", "-f", join(dir, key)]);
  }
  const authorized = join(dir, "authorized_keys");
  writeFileSync(authorized, readFileSync(join(dir, "client_key.pub")), { mode: 0o600 });
  const conf = join(dir, "sshd_config");
  writeFileSync(
    conf,
    [
      `Port ${port}`,
      "ListenAddress 127.0.0.1",
      `HostKey ${join(dir, "host_key")}`,
      `AuthorizedKeysFile ${authorized}`,
      "PermitRootLogin prohibit-password",
      "PasswordAuthentication no",
      "KbdInteractiveAuthentication no",
      "UsePAM no",
      `PidFile ${join(dir, "sshd.pid")}`,
      // The keys live under /tmp, which is world-writable: strict modes would refuse them.
      "StrictModes no",
      "",
    ].join("\n"),
  );
  // The client side: libvirt's command= runs this instead of ssh.
  const ssh = join(dir, "ssh");
  writeFileSync(
    ssh,
    "#!/bin/sh\nexec ssh -o UserKnownHostsFile=/dev/null -o StrictHostKeyChecking=no " +
      '-o LogLevel=ERROR "$@"\n',
    { mode: 0o755 },
  );
  mkdirSync("/run/sshd", { recursive: true }); // sshd's privilege separation directory
  // sshd insists on being started by its absolute path.
  const child = spawn("/usr/sbin/sshd", ["-D", "-e", "-f", conf], {
    env: ENV,
    stdio: ["ignore", "ignore", "pipe"],
  });
  let log = "";
  let alive = true;
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (d: string) => log += d);
  const exited = new Promise<void>((resolve) =>
    child.on("close", () => {
      alive = false;
      resolve();
    })
  );
  const cleanup = async () => {
    if (alive) child.kill("SIGTERM");
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  const query = `keyfile=${join(dir, "client_key")}&no_tty=1&command=${ssh}`;
  const uri = `qemu+ssh://root@127.0.0.1:${port}/system?${query}`;
  try {
    await waitFor(`sshd on port ${port}`, () => {
      if (!alive) throw new Error(`sshd exited: ${log}`);
      return /Server listening/.test(log);
    });
    if (!answers(uri)) throw new Error(`virsh -c ${uri} fails: ${log}`);
  } catch (err) {
    await cleanup();
    throw err;
  }
  return { uri, log: () => log, cleanup };
}

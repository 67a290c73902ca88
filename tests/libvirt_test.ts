/**
 * The libvirt plugin driven by real clients against a real libvirtd:
 * nbdcopy, nbdinfo and nbdsh, locally and over qemu+tcp, qemu+unix with a
 * socket of another libvirtd, and qemu+ssh through an sshd, by target, by path
 * and by export name; libvirt's own messages for every failure, and a
 * server that keeps serving after them.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { createLibvirtPlugin, type RunningServer, serve } from "../mod.ts";
import {
  captive,
  nbdkitTs,
  nbdsh,
  requireTool,
  scratch,
  sh,
  shAsync,
  shQuote,
  startTestServer,
  type TestServer,
} from "./helpers.ts";
import {
  freePort,
  type LibvirtEnv,
  must,
  type RemoteLibvirtd,
  setupLibvirt,
  startRemoteLibvirtd,
  startSshd,
} from "./libvirt_env.ts";

/** The URI of export `name` of a server on `socket`. */
function exportUri(socket: string, name: string): string {
  return `nbd+unix:///${encodeURIComponent(name)}?socket=${socket}`;
}

/** Let the server's stderr reach us (clients run synchronously, blocking our event loop). */
function settle(): Promise<void> {
  return new Promise((r) => setTimeout(r, 300));
}

/** Our stderr shows `message` and none of libvirt's own "libvirt: … error : …" lines. */
function assertLogged(stderr: string, message: string): void {
  assert.ok(stderr.includes(message), `expected "${message}" on stderr, got:\n${stderr}`);
  assert.doesNotMatch(stderr, /^libvirt: /m);
}

/** A client that fails to open `name` on `server`. */
function assertOpenFails(server: TestServer, name: string): void {
  const r = sh(`nbdinfo --size '${exportUri(server.socket, name)}'`);
  assert.notEqual(r.status, 0, `opening '${name}' should fail`);
  assert.match(r.stderr, /server replied with error|has no export/);
}

/** The SHA-256 of what nbdcopy reads from `uri`, copied to a file. */
function copyAndHash(uri: string, dir: string): string {
  const out = join(dir, "copy.raw");
  const r = sh(`nbdcopy '${uri}' '${out}' && sha256sum '${out}' && rm -f '${out}'`);
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.split(" ")[0];
}

/**
 * {@linkcode copyAndHash} without blocking the event loop, for a server
 * running in this process (`serve()`), copied to `dir/name`.
 */
async function copyAndHashAsync(uri: string, dir: string, name: string): Promise<string> {
  const out = join(dir, name);
  const r = await shAsync(`nbdcopy '${uri}' '${out}' && sha256sum '${out}' && rm -f '${out}'`);
  assert.equal(r.status, 0, r.stderr);
  return r.stdout.split(" ")[0];
}

describe("libvirt plugin", () => {
  let env: LibvirtEnv;
  let remote: RemoteLibvirtd;
  let dir: string;
  let cleanup: () => void;

  before(async () => {
    for (const tool of ["nbdinfo", "nbdsh", "nbdcopy", "virsh", "qemu-img", "ssh", "ssh-keygen"]) {
      requireTool(tool);
    }
    requireTool("/usr/sbin/sshd"); // openssh-server, for qemu+ssh
    env = await setupLibvirt();
    remote = await startRemoteLibvirtd();
    ({ dir, cleanup } = scratch());
  });

  after(async () => {
    await remote?.cleanup();
    env?.cleanup();
    cleanup?.();
  });

  test("nbdcopy to a file: the disk's exact bytes, by target and by path", async () => {
    const sda = env.disk("sda");
    for (const disk of [sda.target, sda.path]) {
      const r = await captive(
        ["libvirt", `domain=${env.domain}`, `disk=${disk}`],
        `nbdcopy "$uri" '${dir}/sda.raw' && sha256sum '${dir}/sda.raw'; rm -f '${dir}/sda.raw'`,
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.split(" ")[0], sda.sha256, disk);
      assert.doesNotMatch(r.stderr, /error/);
    }
  });

  test("connect=qemu:///system, and an odd-sized disk", async () => {
    const sdb = env.disk("sdb");
    const r = await captive(
      ["libvirt", "connect=qemu:///system", `domain=${env.domain}`, "disk=sdb"],
      'nbdinfo --size "$uri"; nbdcopy "$uri" - | sha256sum',
    );
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split(/\s+/).slice(0, 2), [String(sdb.size), sdb.sha256]);
  });

  test("over qemu+tcp from a second libvirtd", async () => {
    const server = await startTestServer(
      ["libvirt", `connect=${remote.uri}`, `domain=${env.domain}`, "disk=sda"],
    );
    try {
      assert.equal(copyAndHash(server.uri, dir), env.disk("sda").sha256);
    } finally {
      await server.stop();
    }
  });

  test("over qemu+unix with socket=: that libvirtd, and only that one", async () => {
    // The second libvirtd's own socket: with a socket that is not there, the
    // same URI fails with libvirt's message naming it, so the parameter is
    // what chose the daemon.
    const sdb = env.disk("sdb");
    const uri = `qemu+unix:///system?socket=${remote.unixSocket}`;
    const r = await captive(
      ["libvirt", `connect=${uri}`, `domain=${env.domain}`, "disk=sdb"],
      'nbdinfo --size "$uri"; nbdcopy "$uri" - | sha256sum',
    );
    assert.equal(r.status, 0, r.stderr);
    assert.deepEqual(r.stdout.trim().split(/\s+/).slice(0, 2), [String(sdb.size), sdb.sha256]);
    const missing = join(dir, "no-libvirt-sock");
    const bad = await captive(
      ["libvirt", `connect=qemu+unix:///system?socket=${missing}`, `domain=${env.domain}`],
      "true",
    );
    assert.equal(bad.status, 1, bad.stderr);
    assertLogged(bad.stderr, `Failed to connect socket to '${missing}'`);
  });

  test("over qemu+ssh through an sshd on loopback", async () => {
    const sshd = await startSshd();
    try {
      const sdb = env.disk("sdb");
      const r = await captive(
        ["libvirt", `connect=${sshd.uri}`, `domain=${env.domain}`, "disk=sdb"],
        'nbdinfo --size "$uri"; nbdcopy "$uri" - | sha256sum',
      );
      assert.equal(r.status, 0, r.stderr);
      assert.deepEqual(r.stdout.trim().split(/\s+/).slice(0, 2), [String(sdb.size), sdb.sha256]);
      assert.match(sshd.log(), /Accepted publickey for root/);
    } finally {
      await sshd.cleanup();
    }
  });

  test("createLibvirtPlugin(): two instances in one process, each its own disk and connection", async () => {
    // Each serves its own disk of the test domain: sda (256 MiB) by target,
    // over the local libvirtd; sdb (3 MiB and 512 bytes) by source path, over
    // the second libvirtd (qemu+tcp). Were the configuration shared, as it
    // was at module level, the second's parameters would have made the first
    // serve sdb too. The first is read again once the second is closed: the
    // second's unload closes its own connection, not the first's.
    const sda = env.disk("sda");
    const sdb = env.disk("sdb");
    const first = await serve(createLibvirtPlugin(), {
      config: { domain: env.domain, disk: "sda" },
      unixSocket: join(dir, "first.sock"),
    });
    let second: RunningServer | undefined;
    try {
      second = await serve(createLibvirtPlugin(), {
        config: { connect: remote.uri, domain: env.domain, disk: sdb.path },
        unixSocket: join(dir, "second.sock"),
      });
      const [a, b] = await Promise.all([
        copyAndHashAsync(first.uri, dir, "first.raw"),
        copyAndHashAsync(second.uri, dir, "second.raw"),
      ]);
      assert.equal(a, sda.sha256, "first: sda");
      assert.equal(b, sdb.sha256, "second: sdb");
      const sizes = await shAsync(
        `nbdinfo --size '${first.uri}' && nbdinfo --size '${second.uri}'`,
      );
      assert.equal(sizes.status, 0, sizes.stderr);
      assert.deepEqual(sizes.stdout.trim().split("\n"), [String(sda.size), String(sdb.size)]);
      await second.close();
      second = undefined;
      assert.equal(await copyAndHashAsync(first.uri, dir, "first.raw"), sda.sha256);
    } finally {
      await second?.close();
      await first.close();
    }
  });

  test("nbdinfo --json: read-only, multi-conn, the capacity, the source as description", async () => {
    const sda = env.disk("sda");
    const r = await captive(
      ["libvirt", `domain=${env.domain}`, "disk=sda"],
      'nbdinfo --json "$uri"',
    );
    assert.equal(r.status, 0, r.stderr);
    const exp = JSON.parse(r.stdout).exports[0];
    assert.equal(exp["export-size"], sda.size);
    assert.equal(exp.is_read_only, true);
    assert.equal(exp.can_multi_conn, true);
    assert.equal(exp.can_zero, false);
    assert.equal(exp.description, sda.path);
  });

  test("the size is the capacity, the same as nbdkit's libvirt plugin reports for raw disks", async () => {
    for (const d of env.disks.filter((d) => d.format === "raw")) {
      const theirs = sh(
        `nbdkit -U - libvirt domain=${env.domain} disk=${d.target} --run 'nbdinfo --size "$uri"'`,
      );
      assert.equal(theirs.status, 0, theirs.stderr);
      const ours = await captive(
        ["libvirt", `domain=${env.domain}`, `disk=${d.target}`],
        'nbdinfo --size "$uri"',
      );
      assert.equal(ours.stdout.trim(), theirs.stdout.trim(), d.target);
    }
  });

  test("WRITE, TRIM and WRITE_ZEROES are refused with EPERM, as nbdkit's plugin refuses them", async () => {
    // Strict mode off: libnbd sends the commands the export does not offer.
    const python = [
      "import errno",
      "h.set_strict_mode(0)",
      "for f in (lambda: h.pwrite(b'x' * 512, 0), lambda: h.trim(512, 0), lambda: h.zero(512, 0)):",
      "  try:",
      "    f()",
      "    print('done')",
      "  except nbd.Error as e:",
      "    print(errno.errorcode.get(e.errnum))",
    ].join("\n");
    const params = ["libvirt", `domain=${env.domain}`, "disk=sdb"];
    const server = await startTestServer(params);
    try {
      const r = nbdsh(server.uri, python);
      assert.deepEqual(r.stdout.trim().split("\n"), ["EPERM", "EPERM", "EPERM"], r.stderr);
      const run = `nbdsh -u "$uri" -c ${shQuote(python)}`;
      const theirs = sh(`nbdkit -U - ${params.map(shQuote).join(" ")} --run ${shQuote(run)}`);
      assert.equal(theirs.stdout, r.stdout, theirs.stderr);
      assert.equal(copyAndHash(server.uri, dir), env.disk("sdb").sha256);
    } finally {
      await server.stop();
    }
  });

  test("without disk=, every disk is an export named by its target", async () => {
    const server = await startTestServer(["libvirt", `domain=${env.domain}`]);
    try {
      const list = sh(`nbdinfo --list --json '${server.uri}'`);
      assert.equal(list.status, 0, list.stderr);
      const exports = JSON.parse(list.stdout).exports as Record<string, unknown>[];
      assert.deepEqual(
        exports.map((e) => [e["export-name"], e.description]),
        env.disks.filter((d) => d.format === "raw").map((d) => [d.target, d.path]),
      );
      const sdb = env.disk("sdb");
      assert.equal(copyAndHash(exportUri(server.socket, "sdb"), dir), sdb.sha256);
      // The export name may also be the source path; "" is the first disk.
      assert.equal(copyAndHash(exportUri(server.socket, sdb.path), dir), sdb.sha256);
      const size = sh(`nbdinfo --size '${server.uri}'`);
      assert.equal(size.stdout.trim(), String(env.disk("sda").size));
    } finally {
      await server.stop();
    }
  });

  test("start-up errors: libvirt's message, one line, exit status 1", async () => {
    const cases: [string[], string][] = [
      [
        ["domain=nbdkit-ts-no-such"],
        "Domain not found: no domain with matching name 'nbdkit-ts-no-such'",
      ],
      [
        [`domain=${env.domain}`, "disk=sdz"],
        "invalid argument: invalid path sdz not assigned to domain",
      ],
      [
        [`domain=${env.domain}`, "disk=sdc"],
        "Operation not supported: peeking is only supported for disk with 'raw' format not 'qcow2'",
      ],
      [["disk=sda"], "the 'domain' parameter is required"],
      [[`domain=${env.domain}`, "foo=bar"], "unknown parameter 'foo'"],
      [
        [`connect=qemu+tcp://127.0.0.1:1/system`, `domain=${env.domain}`],
        "unable to connect to server at '127.0.0.1:1': Connection refused",
      ],
    ];
    for (const [params, message] of cases) {
      const r = await nbdkitTs(["-U", "-", "libvirt", ...params, "--run", "true"]);
      assert.equal(r.status, 1, `${params.join(" ")}: ${r.stderr}`);
      assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
      assertLogged(r.stderr, message);
    }
  });

  test("unknown disk, qcow2 disk: the client fails, the server carries on", async () => {
    const server = await startTestServer(["libvirt", `domain=${env.domain}`]);
    try {
      assertOpenFails(server, "sdz");
      assertOpenFails(server, "sdc");
      assert.equal(copyAndHash(exportUri(server.socket, "sdb"), dir), env.disk("sdb").sha256);
      await settle();
      assertLogged(server.stderr(), "invalid argument: invalid path sdz not assigned to domain");
      assertLogged(
        server.stderr(),
        "Operation not supported: peeking is only supported for disk with 'raw' format not 'qcow2'",
      );
    } finally {
      await server.stop();
    }
  });

  test("a domain undefined while serving: the client fails; defined again: data again", async () => {
    const server = await startTestServer(["libvirt", `domain=${env.domain}`, "disk=sdb"]);
    const xml = join(dir, "domain.xml");
    writeFileSync(xml, must("virsh", ["-c", "qemu:///system", "dumpxml", env.domain]));
    try {
      must("virsh", ["-c", "qemu:///system", "undefine", env.domain]);
      assertOpenFails(server, "");
    } finally {
      must("virsh", ["-c", "qemu:///system", "define", xml]);
    }
    try {
      assert.equal(copyAndHash(server.uri, dir), env.disk("sdb").sha256);
      await settle();
      assertLogged(
        server.stderr(),
        `Domain not found: no domain with matching name '${env.domain}'`,
      );
    } finally {
      await server.stop();
    }
  });

  test("libvirtd stopped while serving: libvirt's message, then data once it is back", async () => {
    const server = await startTestServer(
      ["libvirt", `connect=${remote.uri}`, `domain=${env.domain}`, "disk=sdb"],
    );
    try {
      assert.equal(copyAndHash(server.uri, dir), env.disk("sdb").sha256);
      await remote.stop();
      try {
        assertOpenFails(server, "");
      } finally {
        await remote.restart();
      }
      assert.equal(copyAndHash(server.uri, dir), env.disk("sdb").sha256);
      const port = new URL(remote.uri.replace("qemu+tcp", "http")).port;
      await settle();
      assertLogged(
        server.stderr(),
        `unable to connect to server at '127.0.0.1:${port}': Connection refused`,
      );
    } finally {
      await server.stop();
    }
  });

  test("reads fail with libvirt's message when libvirtd goes away mid-connection", async () => {
    const server = await startTestServer(
      ["libvirt", `connect=${remote.uri}`, `domain=${env.domain}`, "disk=sdb"],
    );
    try {
      const python = `
import errno, os, signal, time
print(len(h.pread(4096, 0)))
os.kill(${remote.pid}, signal.SIGTERM)
# libvirtd may serve for a while as it stops (longer on a loaded machine).
end = time.time() + 30
while time.time() < end:
    try:
        h.pread(4096, 0)
    except nbd.Error as e:
        print(e.errnum == errno.EIO)
        break
    time.sleep(0.1)
`;
      const r = nbdsh(server.uri, python);
      assert.deepEqual(r.stdout.trim().split("\n"), ["4096", "True"], r.stderr);
      await settle();
      assert.match(
        server.stderr(),
        /libvirt\[\d+\]: error: .*(socket|End of file|Cannot (recv|write))/,
      );
      assert.doesNotMatch(server.stderr(), /^libvirt: /m);
    } finally {
      await remote.stop();
      await remote.restart();
      await server.stop();
    }
  });
});

describe("libvirt plugin with guestfish (libguestfs-tools)", () => {
  // .ci/setup installs libguestfs-tools: a missing guestfish fails here, it is not skipped.
  test("the manual's example: guestfish --ro --format=raw -a nbd://…", async () => {
    requireTool("guestfish");
    const env = await setupLibvirt({ extraDisks: false, bigSize: 1024 * 1024, fsDisk: true });
    try {
      // The example over TCP, as written: guestfish -a nbd://localhost[:PORT].
      // force_tcg: qemu -cpu max under KVM aborts on this (nested) host with
      // "failed to set MSR 0x10a"; libguestfs-test-tool passes with TCG.
      const port = await freePort();
      const r = await nbdkitTs(
        [
          "-p",
          String(port),
          "libvirt",
          `domain=${env.domain}`,
          "disk=sdd",
          "--run",
          `guestfish --ro --format=raw -a nbd://localhost:${port} run : mount /dev/sda / : cat /hello.txt`,
        ],
        {
          env: { LIBGUESTFS_BACKEND: "direct", LIBGUESTFS_BACKEND_SETTINGS: "force_tcg" },
          timeoutMs: 600_000,
        },
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.trim(), "hello from nbdkit-ts");
    } finally {
      env.cleanup();
    }
  });
});

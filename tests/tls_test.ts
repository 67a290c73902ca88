/**
 * TLS as nbdkit does it, driven by real clients: nbdinfo, nbdcopy and nbdsh
 * (libnbd, GnuTLS) with nbds:// URIs, qemu-img with tls-creds-x509, and, for
 * what those clients never do, a raw client: options before STARTTLS, a
 * client certificate from another CA. Certificates are made here with
 * certtool, keys with psktool.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { spawn, spawnSync } from "node:child_process";
import { connect as netConnect, type Socket } from "node:net";
import { connect as tlsConnect, type TLSSocket } from "node:tls";
import { join } from "node:path";
import {
  captive,
  nbdkitTs,
  ourCommand,
  requireTool,
  scratch,
  sh,
  shQuote,
  startTestServer,
} from "./helpers.ts";
import { CMD, concat, OPT, RawClient, requestBytes, u16, u32 } from "./raw_client.ts";

const NBD_OPT_STARTTLS = 5;
const NBD_REP_ACK = 1;
const NBD_REP_ERR_TLS_REQD = 0x80000005;

function sha256(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** Exit status 1 and exactly one line on stderr, matching `pattern`. */
async function failsWith(args: string[], pattern: RegExp): Promise<void> {
  const r = await nbdkitTs([...args, "--run", "true"]);
  assert.equal(r.status, 1, `${args.join(" ")}: ${r.stderr}`);
  assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, pattern);
}

/** Make a CA in `dir` (ca-key.pem, ca-cert.pem) with certtool. */
function makeCa(dir: string, cn: string): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, "ca.info"), `cn = ${cn}\nca\ncert_signing_key\nexpiration_days = 30\n`);
  const r = sh(
    `cd ${shQuote(dir)} && certtool --generate-privkey --outfile ca-key.pem && ` +
      `certtool --generate-self-signed --load-privkey ca-key.pem --template ca.info ` +
      `--outfile ca-cert.pem`,
  );
  assert.equal(r.status, 0, r.stderr);
}

/** Issue `NAME-cert.pem` and `NAME-key.pem` in `dir`, signed by the CA in `caDir`. */
function makeCert(dir: string, caDir: string, name: string, template: string): void {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, `${name}.info`), `${template}expiration_days = 30\n`);
  const r = sh(
    `cd ${shQuote(dir)} && certtool --generate-privkey --outfile ${name}-key.pem && ` +
      `certtool --generate-certificate --load-ca-certificate ${shQuote(caDir)}/ca-cert.pem ` +
      `--load-ca-privkey ${shQuote(caDir)}/ca-key.pem --load-privkey ${name}-key.pem ` +
      `--template ${name}.info --outfile ${name}-cert.pem`,
  );
  assert.equal(r.status, 0, r.stderr);
}

/** Bytes from a socket, read exactly. */
class Bytes {
  #chunks: Uint8Array[] = [];
  #length = 0;
  #ended = false;
  #wake: (() => void) | null = null;

  constructor(stream: Socket | TLSSocket) {
    stream.on("data", (d: Uint8Array) => {
      this.#chunks.push(d);
      this.#length += d.length;
      this.#poke();
    });
    for (const event of ["end", "close", "error"]) {
      stream.on(event, () => {
        this.#ended = true;
        this.#poke();
      });
    }
  }

  #poke(): void {
    const w = this.#wake;
    this.#wake = null;
    w?.();
  }

  /** Exactly `n` bytes, or null when the stream ended first. */
  async read(n: number): Promise<Uint8Array | null> {
    const deadline = Date.now() + 10_000;
    while (this.#length < n) {
      if (this.#ended) return null;
      if (Date.now() > deadline) throw new Error(`timed out waiting for ${n} bytes`);
      await new Promise<void>((r) => {
        this.#wake = r;
        setTimeout(r, 50);
      });
    }
    const all = new Uint8Array(this.#length);
    let at = 0;
    for (const c of this.#chunks) {
      all.set(c, at);
      at += c.length;
    }
    this.#chunks = [all.subarray(n)];
    this.#length -= n;
    return all.slice(0, n);
  }
}

/**
 * What the Python clients below share: raw option I/O, and `starttls(path,
 * ca)`, a connection that greets, upgrades to TLS and returns the TLS socket,
 * its receive buffer small so that replies it does not read back up at once.
 */
const PY_TLS_CLIENT = `
import os, socket, ssl, struct, sys, threading, time
def exactly(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c: raise EOFError("closed")
        b += c
    return b
def option(s, code, data=b""):
    s.sendall(b"IHAVEOPT" + struct.pack(">II", code, len(data)) + data)
def reply(s):
    h = exactly(s, 20)
    exactly(s, struct.unpack(">I", h[16:20])[0])
    return struct.unpack(">I", h[12:16])[0]
def starttls(path, ca):
    s = socket.socket(socket.AF_UNIX)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(path)
    exactly(s, 18); s.sendall(struct.pack(">I", 3))
    option(s, 5); assert reply(s) == 1
    ctx = ssl.create_default_context(cafile=ca); ctx.check_hostname = False
    return ctx.wrap_socket(s)
`;

/**
 * argv: socket, CA file, server pid. Greets, STARTTLS, GO, then sends 64 KiB
 * READs for 3 seconds and reads nothing; prints the requests sent and how
 * much the server's resident memory grew (KiB).
 */
const TLS_FLOOD = PY_TLS_CLIENT + `
path, ca, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
def rss():
    for line in open("/proc/%d/status" % pid):
        if line.startswith("VmRSS"): return int(line.split()[1])
s = starttls(path, ca)
option(s, 7, struct.pack(">IH", 0, 0))
while reply(s) != 1: pass
before = rss()
batch = struct.pack(">IHHQQI", 0x25609513, 0, 0, 1, 0, 65536) * 500
sent = [0]
def run():
    try:
        while True: s.sendall(batch); sent[0] += 500
    except OSError: pass
threading.Thread(target=run, daemon=True).start()
time.sleep(3)
print(sent[0], rss() - before, flush=True)
os._exit(0)  # the sender is blocked in sendall: leave without waiting for it
`;

/**
 * argv: socket, CA file. STARTTLS, then 1000 NBD_OPT_INFO with 4096-byte
 * names (some 4 MiB of replies), NBD_OPT_ABORT, and it reads nothing more;
 * prints "sent" and waits to be killed.
 */
const TLS_STALL = PY_TLS_CLIENT + `
s = starttls(sys.argv[1], sys.argv[2])
name = b"x" * 4096
for i in range(1000):
    option(s, 6, struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, 1))
option(s, 2)
print("sent", flush=True)
time.sleep(120)
`;

const IHAVEOPT = new Uint8Array([0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54]);

function option(code: number, data: Uint8Array = new Uint8Array(0)): Uint8Array {
  return concat(IHAVEOPT, u32(code), u32(data.length), data);
}

/** Read one option reply: its type, or null when the connection ended. */
async function replyType(bytes: Bytes): Promise<number | null> {
  const head = await bytes.read(20);
  if (!head) return null;
  const v = new DataView(head.buffer, head.byteOffset, 20);
  const len = v.getUint32(16);
  if (len > 0 && !(await bytes.read(len))) return null;
  return v.getUint32(12);
}

/**
 * Greet, STARTTLS in clear, then a TLS session from node:tls with
 * `credentials`; resolves with the TLS socket once the client side of the
 * handshake is done (with TLS 1.3 the server may still refuse afterwards).
 */
async function startTls(
  socketPath: string,
  credentials: { ca: string; cert?: string; key?: string },
): Promise<TLSSocket> {
  const sock = netConnect({ path: socketPath });
  await new Promise<void>((resolve, reject) => {
    sock.once("connect", resolve);
    sock.once("error", reject);
  });
  const plain = new Bytes(sock);
  assert.ok(await plain.read(18), "greeting");
  sock.write(u32(3));
  sock.write(option(NBD_OPT_STARTTLS));
  assert.equal(await replyType(plain), NBD_REP_ACK);
  sock.removeAllListeners("data");
  const secure = tlsConnect({ socket: sock, servername: "localhost", ...credentials });
  await new Promise<void>((resolve, reject) => {
    secure.once("secureConnect", resolve);
    secure.once("error", reject);
  });
  return secure;
}

/** NBD_OPT_GO for the default export over `stream`; resolves to the final reply type. */
async function go(stream: TLSSocket, bytes: Bytes): Promise<number | null> {
  stream.write(option(OPT.GO, concat(u32(0), u16(0))));
  while (true) {
    const type = await replyType(bytes);
    if (type === null || type === NBD_REP_ACK || type >= 0x80000000) return type;
  }
}

describe("TLS", () => {
  let dir: string;
  let cleanup: () => void;
  /** The server folder: ca-cert.pem, server-cert.pem, server-key.pem. */
  let certs: string;
  /** Client folders for libnbd: with a client certificate, without, from another CA. */
  let withCert: string;
  let noCert: string;
  let otherCa: string;
  let psk: string;
  let wrongPsk: string;
  /** The runtime our server runs on (it may differ from the tests' with NBDKIT_TS_CMD). */
  let runtime: string;

  before(async () => {
    for (
      const tool of ["certtool", "psktool", "nbdinfo", "nbdcopy", "nbdsh", "qemu-img", "nbdkit"]
    ) {
      requireTool(tool);
    }
    ({ dir, cleanup } = scratch());
    certs = join(dir, "server");
    withCert = join(dir, "client");
    noCert = join(dir, "anonymous");
    otherCa = join(dir, "other");
    makeCa(certs, "nbdkit-ts test CA");
    makeCert(
      certs,
      certs,
      "server",
      "organization = nbdkit-ts\ncn = localhost\ndns_name = localhost\n" +
        "ip_address = 127.0.0.1\ntls_www_server\nencryption_key\nsigning_key\n",
    );
    makeCert(
      withCert,
      certs,
      "client",
      "cn = client\ntls_www_client\nencryption_key\nsigning_key\n",
    );
    makeCa(otherCa, "another CA");
    makeCert(
      otherCa,
      otherCa,
      "client",
      "cn = client\ntls_www_client\nencryption_key\nsigning_key\n",
    );
    mkdirSync(noCert);
    for (const d of [withCert, noCert]) {
      writeFileSync(join(d, "ca-cert.pem"), readFileSync(join(certs, "ca-cert.pem")));
    }
    psk = join(dir, "keys.psk");
    wrongPsk = join(dir, "wrong.psk");
    for (const file of [psk, wrongPsk]) {
      const r = sh(`psktool -u alice -p ${shQuote(file)}`);
      assert.equal(r.status, 0, r.stderr);
    }
    const version = await nbdkitTs(["-V"]);
    runtime = /\((deno|bun|node) /.exec(version.stdout)?.[1] ?? "";
    assert.notEqual(runtime, "", version.stdout);
  });

  after(() => cleanup());

  test("--tls=require: nbdinfo over nbds+unix sees TLS; $tls is 2, $uri is nbds+unix", async () => {
    const r = await captive(
      ["--tls=require", `--tls-certificates=${certs}`, "memory", "size=16M"],
      `echo "$tls $uri"; nbdinfo --json "$uri&tls-certificates=${noCert}"`,
    );
    assert.equal(r.status, 0, r.stderr);
    const [first, ...rest] = r.stdout.split("\n");
    assert.match(first, /^2 nbds\+unix:\/\/\/\?socket=\S+$/);
    const info = JSON.parse(rest.join("\n"));
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]["export-size"], 16 * 1024 * 1024);
  });

  test("--tls=require over TCP: $uri is nbds://HOST:PORT and the certificate's address verifies", async () => {
    const r = await nbdkitTs([
      "-p",
      "0",
      "-i",
      "127.0.0.1",
      "--tls=require",
      `--tls-certificates=${certs}`,
      "null",
      "size=1M",
      "--run",
      `echo "$uri"; nbdinfo --size "$uri?tls-certificates=${noCert}"`,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^nbds:\/\/127\.0\.0\.1:\d+\n1048576\n$/);
  });

  test("--tls=require refuses clients in clear: nbdinfo fails, options get NBD_REP_ERR_TLS_REQD", async () => {
    const r = await captive(
      ["--tls=require", `--tls-certificates=${certs}`, "memory", "size=1M"],
      `nbdinfo "nbd+unix:///?socket=$unixsocket"`,
    );
    assert.notEqual(r.status, 0, r.stdout);
    assert.doesNotMatch(r.stdout, /export-size/);

    const server = await startTestServer([
      "--tls=require",
      `--tls-certificates=${certs}`,
      "memory",
      "size=1M",
    ]);
    try {
      const c = await RawClient.connect(server.socket);
      await c.greet();
      for (
        const [code, data] of [
          [OPT.GO, concat(u32(0), u16(0))],
          [OPT.LIST, new Uint8Array(0)],
          [OPT.STRUCTURED_REPLY, new Uint8Array(0)],
        ] as const
      ) {
        c.option(code, data);
        const reply = await c.optionReply();
        assert.equal(reply?.type, NBD_REP_ERR_TLS_REQD, `option ${code}`);
      }
      c.option(OPT.ABORT);
      assert.equal((await c.optionReply())?.type, NBD_REP_ACK);

      // NBD_OPT_EXPORT_NAME has no error reply: the connection is closed, no export sent.
      const e = await RawClient.connect(server.socket);
      await e.greet();
      e.option(OPT.EXPORT_NAME);
      assert.equal(await e.read(10), null);
      assert.match(
        await server.waitForStderr(/EXPORT_NAME before TLS/),
        /error: client sent NBD_OPT_EXPORT_NAME before TLS, which is required/,
      );
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test("--tls=on serves clients with and without TLS; $tls is 1 and $uri stays nbd+unix, as nbdkit's", async () => {
    const script = `echo "$tls $uri"
      nbdinfo --json "$uri" | grep '"TLS"'
      nbdinfo --json "nbds+unix:///?socket=$unixsocket&tls-certificates=${noCert}" | grep '"TLS"'`;
    const r = await captive(
      ["--tls=on", `--tls-certificates=${certs}`, "memory", "size=1M"],
      script,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /^1 nbd\+unix:\/\/\/\?socket=\S+\n"TLS": false,\n"TLS": true,\n$/);
    const theirs = sh(`nbdkit -U - --tls=on --tls-certificates=${shQuote(certs)} memory size=1M \
      --run ${shQuote(script)}`);
    assert.equal(theirs.status, 0, theirs.stderr);
    assert.match(theirs.stdout, /^1 nbd\+unix:\/\/\?socket=\S+\n"TLS": false,\n"TLS": true,\n$/);
  });

  test("without --tls, as nbdkit: certificates turn TLS on; --tls=off turns it off (STARTTLS refused)", async () => {
    const on = await captive([`--tls-certificates=${certs}`, "null"], 'echo "$tls $uri"');
    assert.match(on.stdout, /^1 nbd\+unix:/, on.stderr);
    const off = await captive(
      ["--tls=off", `--tls-certificates=${certs}`, "null"],
      `echo "$tls $uri"; nbdinfo "nbds+unix:///?socket=$unixsocket&tls-certificates=${noCert}"`,
    );
    assert.notEqual(off.status, 0);
    assert.match(off.stdout, /^0 nbd\+unix:/);
  });

  test("nbdcopy copies 16 MiB of random data in and out over TLS", async () => {
    const image = join(dir, "random.img");
    const back = join(dir, "back.img");
    assert.equal(sh(`head -c 16M /dev/urandom > ${shQuote(image)}`).status, 0);
    const r = await captive(
      ["--tls=require", `--tls-certificates=${certs}`, "memory", "size=16M"],
      `U="$uri&tls-certificates=${noCert}"
       nbdcopy ${shQuote(image)} "$U" && nbdcopy "$U" ${shQuote(back)}`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(sha256(back), sha256(image));
  });

  test("the last replies go out before the TLS connection closes: ABORT's ACK, READs before DISC", async () => {
    const image = join(dir, "tail.img");
    assert.equal(sh(`head -c 16M /dev/urandom > ${shQuote(image)}`).status, 0);
    const disk = readFileSync(image);
    const server = await startTestServer([
      "--tls=require",
      `--tls-certificates=${certs}`,
      "file",
      image,
    ]);
    const ca = readFileSync(join(certs, "ca-cert.pem"), "utf8");
    try {
      for (let round = 0; round < 3; round++) {
        const aborting = await startTls(server.socket, { ca });
        const bytes = new Bytes(aborting);
        aborting.write(option(OPT.ABORT));
        assert.equal(await replyType(bytes), NBD_REP_ACK, "NBD_OPT_ABORT over TLS");
        aborting.destroy();
      }
      // Ten 1 MiB READs and DISC in one go: all ten replies, whole, then the end.
      const reading = await startTls(server.socket, { ca });
      const bytes = new Bytes(reading);
      assert.equal(await go(reading, bytes), NBD_REP_ACK);
      const MiB = 1024 * 1024;
      for (let i = 0; i < 10; i++) {
        reading.write(requestBytes(CMD.READ, BigInt(i * MiB), MiB, { cookie: BigInt(i) }));
      }
      reading.write(requestBytes(CMD.DISC, 0n, 0));
      for (let i = 0; i < 10; i++) {
        const header = await bytes.read(16);
        assert.ok(header, `reply ${i} never came`);
        const v = new DataView(header.buffer, header.byteOffset, 16);
        assert.equal(v.getUint32(4), 0, `reply ${i}: error`);
        const cookie = Number(v.getBigUint64(8));
        const data = await bytes.read(MiB);
        assert.ok(data, `reply ${i} was cut off`);
        assert.ok(
          disk.subarray(cookie * MiB, (cookie + 1) * MiB).equals(data),
          `reply ${i} (cookie ${cookie}): wrong data`,
        );
      }
      assert.equal(await bytes.read(1), null, "bytes after the last reply");
      reading.destroy();
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test("a TLS client that never reads its replies cannot grow the server without bound", async () => {
    const server = await startTestServer([
      "--tls=require",
      `--tls-certificates=${certs}`,
      "memory",
      "size=16M",
    ]);
    try {
      // Python's ssl over a socket with a small receive buffer that is never
      // read: the server's replies back up as far as its own memory. Before
      // the fix Deno held the requests (4.8 GiB in 12 s), Bun the replies.
      const flood = spawnSync("python3", [
        "-c",
        TLS_FLOOD,
        server.socket,
        join(certs, "ca-cert.pem"),
        String(server.pid),
      ], {
        encoding: "utf8",
        timeout: 60_000,
      });
      assert.equal(flood.status, 0, flood.stderr);
      const [sent, grewKiB] = flood.stdout.trim().split(" ").map(Number);
      // Enough requests that their replies, 64 KiB each, would be over 1 GiB
      // held (this machine sends 150 000 or more in the 3 s; a loaded one fewer).
      assert.ok(sent > 20_000, `only ${sent} requests sent`);
      assert.ok(
        grewKiB < 160 * 1024,
        `resident memory grew by ${grewKiB} KiB after ${sent} requests`,
      );
      // The requests left when that client went are not served for nobody:
      // the next client is answered at once.
      const r = sh(
        `timeout 20 nbdinfo --size ${
          shQuote(`nbds+unix:///?socket=${server.socket}&tls-certificates=${noCert}`)
        }`,
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.trim(), String(16 << 20));
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test("a TLS client that aborts and takes none of its replies does not hold up a shutdown", async () => {
    const server = await startTestServer([
      "--tls=require",
      `--tls-certificates=${certs}`,
      "memory",
      "size=16M",
    ]);
    const client = spawn("python3", ["-c", TLS_STALL, server.socket, join(certs, "ca-cert.pem")], {
      stdio: ["ignore", "pipe", "pipe"],
    });
    try {
      const said = await new Promise<string>((resolve) => {
        client.stdout!.once("data", (d) => resolve(String(d).trim()));
        client.once("close", (code) => resolve(`exit ${code}`));
      });
      assert.equal(said, "sent");
      await new Promise((r) => setTimeout(r, 500));
      // Bun's TLS socket queues the replies; the graceful close waited for
      // them forever, and SIGTERM with it.
      let timer: ReturnType<typeof setTimeout> | undefined;
      const status = await Promise.race([
        server.stop(),
        new Promise<string>((r) => timer = setTimeout(() => r("still running after 20 s"), 20_000)),
      ]);
      clearTimeout(timer);
      if (status !== 0) process.kill(server.pid, "SIGKILL");
      assert.equal(status, 0);
    } finally {
      client.kill("SIGKILL");
    }
  });

  test("qemu-img reads and writes over TLS with tls-creds-x509", async () => {
    const image = join(dir, "qemu-in.img");
    const back = join(dir, "qemu-out.img");
    assert.equal(sh(`head -c 4M /dev/urandom > ${shQuote(image)}`).status, 0);
    const objectOption = `--object tls-creds-x509,id=tls0,endpoint=client,dir=${noCert}`;
    const r = await captive(
      ["--tls=require", `--tls-certificates=${certs}`, "memory", "size=4M"],
      `I="driver=nbd,path=$unixsocket,tls-creds=tls0,tls-hostname=localhost"
       qemu-img convert -n ${objectOption} -f raw ${shQuote(image)} --target-image-opts "$I" &&
       qemu-img convert ${objectOption} --image-opts "$I" -O raw ${shQuote(back)} &&
       qemu-img info ${objectOption} --image-opts "$I" | grep '^virtual size'`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(r.stdout, /virtual size: 4 MiB/);
    assert.equal(sha256(back), sha256(image));
  });

  test("-s: TLS over standard input and output (nbdsh connect_command)", () => {
    const argv = [
      ...ourCommand(),
      "-s",
      "--tls=require",
      `--tls-certificates=${certs}`,
      "memory",
      "1M",
    ];
    const r = sh(`nbdsh -c ${
      shQuote(
        `h.set_tls(nbd.TLS_REQUIRE)\nh.set_tls_certificates(${JSON.stringify(noCert)})\n` +
          `h.connect_command(${JSON.stringify(argv)})\nh.pwrite(b"tls!" * 128, 4096)\n` +
          `print(h.get_tls_negotiated(), h.pread(4, 4096).decode())\nh.shutdown()`,
      )
    }`);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, "True tls!\n");
  });

  test("--tls-verify-peer: a client certificate from the CA is needed (Node and Bun; refused on Deno)", async () => {
    const args = [
      "--tls=require",
      `--tls-certificates=${certs}`,
      "--tls-verify-peer",
      "memory",
      "1M",
    ];
    if (runtime === "deno") {
      await failsWith(args, /--tls-verify-peer.*cannot be checked on Deno.*Bun or Node/);
      return;
    }
    const r = await captive(
      args,
      `nbdinfo --size "$uri&tls-certificates=${withCert}" && ! nbdinfo --size "$uri&tls-certificates=${noCert}"`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout.trim(), "1048576");
    assert.match(r.stderr, /error: TLS handshake failed: /);

    // A certificate signed by another CA: libnbd never sends one, node:tls does.
    const server = await startTestServer(args);
    try {
      const read = (name: string) => readFileSync(join(otherCa, name), "utf8");
      let foreign: TLSSocket | null = null;
      let reply: number | null;
      try {
        foreign = await startTls(server.socket, {
          ca: readFileSync(join(certs, "ca-cert.pem"), "utf8"),
          cert: read("client-cert.pem"),
          key: read("client-key.pem"),
        });
        reply = await go(foreign, new Bytes(foreign));
      } catch {
        reply = null; // refused during the handshake
      }
      foreign?.destroy();
      assert.equal(reply, null, "the export was offered to a client of another CA");
      assert.match(
        // Node refuses after the handshake, Bun's BoringSSL during it.
        await server.waitForStderr(/TLS handshake failed: .*certificate/),
        /error: TLS handshake failed: (the client's certificate was refused: \w+|unable to verify)/,
      );

      // The same raw client with the right certificate gets the export.
      const good = await startTls(server.socket, {
        ca: readFileSync(join(certs, "ca-cert.pem"), "utf8"),
        cert: readFileSync(join(withCert, "client-cert.pem"), "utf8"),
        key: readFileSync(join(withCert, "client-key.pem"), "utf8"),
      });
      assert.equal(await go(good, new Bytes(good)), NBD_REP_ACK);
      good.destroy();
    } finally {
      assert.equal(await server.stop(), 0);
    }
  });

  test("--tls-psk with psktool's keys (Node); a one-line refusal on Deno and Bun", async () => {
    const args = ["--tls=require", `--tls-psk=${psk}`, "memory", "1M"];
    if (runtime !== "node") {
      await failsWith(args, /--tls-psk.*not available on (Deno|Bun).*run nbdkit-ts on Node/);
      return;
    }
    // QEMU reads keys.psk from the folder its tls-creds-psk object names.
    const qemuKeys = join(dir, "qemu-psk");
    mkdirSync(qemuKeys, { recursive: true });
    writeFileSync(join(qemuKeys, "keys.psk"), readFileSync(psk));
    const r = await captive(
      args,
      `echo "$tls $uri"
       nbdinfo --json "nbds+unix://alice@/?socket=$unixsocket&tls-psk-file=${psk}" | grep '"TLS"'
       qemu-img info --object tls-creds-psk,id=tls0,dir=${qemuKeys},username=alice,endpoint=client \
         --image-opts "driver=nbd,path=$unixsocket,tls-creds=tls0" | grep '^virtual size'
       ! nbdinfo "nbds+unix://alice@/?socket=$unixsocket&tls-psk-file=${wrongPsk}"`,
    );
    assert.equal(r.status, 0, r.stderr);
    assert.match(
      r.stdout,
      /^2 nbds\+unix:\/\/\/\?socket=\S+\n"TLS": true,\nvirtual size: 1 MiB .*\n$/,
    );
    assert.match(r.stderr, /error: TLS handshake failed: /);
  });

  test("credentials that cannot be used: one line, exit status 1", async () => {
    const broken = join(dir, "broken");
    mkdirSync(broken);
    for (const f of ["ca-cert.pem", "server-cert.pem"]) {
      writeFileSync(join(broken, f), readFileSync(join(certs, f)));
    }
    await failsWith(
      ["--tls=require", `--tls-certificates=${join(dir, "nowhere")}`, "null"],
      /^nbdkit-ts: error: --tls-certificates: \S+\/nowhere: No such file or directory$/m,
    );
    await failsWith(
      ["--tls=require", `--tls-certificates=${broken}`, "null"],
      /--tls-certificates: \S+\/broken\/server-key\.pem: No such file or directory$/m,
    );
    writeFileSync(join(broken, "server-key.pem"), "not a key\n");
    await failsWith(
      ["--tls=on", `--tls-certificates=${broken}`, "null"],
      /error: \S+\/server-key\.pem: not a usable private key: /,
    );
    writeFileSync(join(broken, "server-key.pem"), readFileSync(join(withCert, "client-key.pem")));
    await failsWith(
      [`--tls-certificates=${broken}`, "null"],
      /server-key\.pem: the private key does not belong to \S+\/server-cert\.pem$/m,
    );
    const badPsk = join(dir, "bad.psk");
    writeFileSync(badPsk, "alice:00ff\nbob=1234\n");
    await failsWith(
      ["--tls=require", `--tls-psk=${badPsk}`, "null"],
      /--tls-psk: \S+\/bad\.psk:2: expected 'identity:hexkey'/,
    );
    await failsWith(["--tls=maybe", "null"], /--tls: 'maybe' must be off, on or require/);
  });

  test("nbdinfo sees the same over TLS from nbdkit and from us", async () => {
    const script = `nbdinfo --json "$uri&tls-certificates=${noCert}"`;
    const ours = await captive(
      ["--tls=require", `--tls-certificates=${certs}`, "memory", "16M"],
      script,
    );
    assert.equal(ours.status, 0, ours.stderr);
    const theirs = sh(
      `nbdkit -U - --tls=require --tls-certificates=${shQuote(certs)} memory 16M --run ${
        shQuote(script)
      }`,
    );
    assert.equal(theirs.status, 0, theirs.stderr);
    const strip = (json: string) => {
      const info = JSON.parse(json);
      for (const e of info.exports) delete e.uri;
      return info;
    };
    assert.equal(strip(theirs.stdout).TLS, true);
    assert.deepEqual(strip(ours.stdout), strip(theirs.stdout));
  });
});

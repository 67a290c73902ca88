/**
 * The command line, as a person coming from nbdkit would use it.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import {
  captive,
  nbdkitTs,
  ourShell,
  ROOT,
  run,
  RUNTIME,
  scratch,
  sh,
  shAsync,
  shQuote,
  shWaitFor,
  withScratch,
} from "./helpers.ts";
import { freePort } from "./libvirt_env.ts";

/** Exit status 1 and exactly one line on stderr that contains `pattern`. */
async function failsWith(args: string[], pattern: RegExp): Promise<void> {
  const r = await nbdkitTs(args);
  assert.equal(r.status, 1, `${args.join(" ")}: ${r.stderr}`);
  assert.equal(r.stderr.trimEnd().split("\n").length, 1, r.stderr);
  assert.match(r.stderr, pattern);
}

describe("command line", () => {
  test("errors: unknown option, plugin, key; missing key; bad size", async () => {
    await failsWith(["--bogus", "memory", "1M"], /^nbdkit-ts: unrecognized option '--bogus'$/m);
    await failsWith(["-Z", "memory"], /invalid option -- 'Z'/);
    await failsWith(["file", "/"], /^nbdkit-ts: error: use dir= to serve files within \/$/m);
    await failsWith(
      ["/usr/lib/x86_64-linux-gnu/nbdkit/plugins/nbdkit-memory-plugin.so", "1M"],
      /^nbdkit-ts: error: cannot open plugin '\S+\.so': a shared library is a C plugin for nbdkit;/m,
    );
    await failsWith(["nope"], /cannot open plugin 'nope'/);
    await failsWith(["./nope.ts"], /cannot open plugin '\.\/nope\.ts'.*No such file/);
    await failsWith(["memory"], /you must specify size=<SIZE>/);
    await failsWith(["memory", "size=1M", "foo=bar"], /unknown parameter 'foo'/);
    await failsWith(["memory", "size=1Q"], /could not parse size: unknown suffix 'Q'/);
    await failsWith(["-p", "http", "null"], /-p: 'http' is not a number/);
    await failsWith(["-t", "0x1g", "null"], /-t: '0x1g' is not a number/);
    await failsWith(["--filter=cow", "null"], /filters are not supported/);
    await failsWith([], /no plugin given/);
    await failsWith(["--vsock", "null"], /^nbdkit-ts: --vsock: AF_VSOCK is not supported$/m);
  });

  test("--help, -V, --dump-config, PLUGIN --help, PLUGIN --dump-plugin", async () => {
    const help = await nbdkitTs(["--help"]);
    assert.equal(help.status, 0);
    assert.match(help.stdout, /--run 'COMMAND'/);
    const version = await nbdkitTs(["-V"]);
    assert.match(version.stdout, /^nbdkit-ts \d+\.\d+\.\d+ \((deno|bun|node) /);
    const config = await nbdkitTs(["--dump-config"]);
    assert.match(config.stdout, /^plugins=.*memory/m);
    // The keys scripts written for nbdkit look for.
    assert.match(config.stdout, /^version_major=\d+\nversion_minor=\d+\n$/m);
    assert.match(config.stdout, /^exit_with_parent=yes$/m);
    const phelp = await nbdkitTs(["memory", "--help"]);
    // As nbdkit: the synopsis, then the plugin and its parameters.
    assert.match(phelp.stdout, /^nbdkit-ts \[-U SOCKET\|-\]/);
    assert.match(phelp.stdout, /^plugin: memory /m);
    assert.match(phelp.stdout, /size=<SIZE>/);
    const pversion = await nbdkitTs(["memory", "--version"]);
    assert.match(pversion.stdout, /^nbdkit-ts \d+\.\d+\.\d+ \(.*\)\nmemory \d+\.\d+\.\d+\n$/);
    // Options that only print something take the serving ones without complaint.
    const ignored = await nbdkitTs(["-U", "-", "memory", "--dump-plugin"]);
    assert.equal(ignored.status, 0, ignored.stderr);
    const dump = await nbdkitTs(["memory", "--dump-plugin"]);
    assert.match(dump.stdout, /^name=memory$/m);
    assert.match(dump.stdout, /^has_pwrite=1$/m);
    assert.match(dump.stdout, /^thread_model=parallel$/m);
  });

  test("memory: nbdkit's allocator=sparse and allocator=malloc run; zstd is refused", async () => {
    for (const allocator of ["sparse", "malloc", "malloc,mlock=true"]) {
      const r = await captive(
        ["memory", "size=1M", `allocator=${allocator}`],
        `nbdsh -u "$uri" -c 'h.pwrite(b"\\x07" * 4096, 8192)' -c 'print(h.pread(4096, 8192) == b"\\x07" * 4096)'`,
      );
      assert.equal(r.stdout.trim(), "True", `${allocator}: ${r.stderr}`);
    }
    await failsWith(["memory", "size=1M", "allocator=zstd"], /allocator=zstd .*is not supported/);
    await failsWith(["memory", "size=1M", "allocator=malloc,x=1"], /unknown option 'x=1'/);
  });

  test("numbers in hexadecimal, as nbdkit takes them: -t 0x10, --mask-handshake=0x3", async () => {
    const r = await captive(
      ["-t", "0x10", "--mask-handshake=0x3", "memory", "size=1M"],
      'nbdinfo --size "$uri"',
    );
    assert.equal(r.stdout.trim(), "1048576", r.stderr);
  });

  test("nbdkit's size suffixes", async () => {
    for (
      const [size, bytes] of [["4k", 4096], ["2s", 1024], ["1M", 1048576], ["1G", 1073741824], [
        "1T",
        1099511627776,
      ]]
    ) {
      const r = await captive(["memory", `size=${size}`], 'nbdinfo --size "$uri"');
      assert.equal(r.stdout.trim(), String(bytes), `${size}: ${r.stderr}`);
    }
  });

  test("without -f it goes to the background once listening; -P writes the pid; SIGTERM cleans up", async () => {
    const { dir, cleanup } = scratch();
    try {
      const sock = join(dir, "sock");
      const pidfile = join(dir, "pid");
      const r = await nbdkitTs(["-U", sock, "-P", pidfile, "memory", "size=1M"]);
      assert.equal(r.status, 0, r.stderr);
      // Listening already when the command returned.
      assert.ok(existsSync(sock));
      const pid = Number(readFileSync(pidfile, "utf8").trim());
      assert.ok(pid > 0);
      const info = sh(`nbdinfo --size 'nbd+unix:///?socket=${sock}'`);
      assert.equal(info.stdout.trim(), "1048576");
      process.kill(pid, "SIGTERM");
      for (let i = 0; i < 100 && (existsSync(sock) || existsSync(pidfile)); i++) {
        await new Promise((r) => setTimeout(r, 50));
      }
      assert.equal(existsSync(sock), false, "socket removed");
      assert.equal(existsSync(pidfile), false, "pidfile removed");
    } finally {
      cleanup();
    }
  });

  test("in the background, -v keeps the server's messages on our stderr, as nbdkit's", async () => {
    await withScratch(async (dir) => {
      const sock = join(dir, "sock");
      const pidfile = join(dir, "pid");
      const log = join(dir, "log");
      const r = await shAsync(
        `${ourShell()} -v -U ${sock} -P ${pidfile} memory size=1M 2>${log}; echo "status=$?"
         nbdinfo --size 'nbd+unix:///?socket=${sock}'
         kill $(cat ${pidfile}); ${shWaitFor(`! -S ${sock}`)}`,
      );
      assert.equal(r.stdout, "status=0\n1048576\n", r.stderr);
      // The negotiation of nbdinfo's connection, written by the server after
      // the command that started it had returned.
      const text = readFileSync(log, "utf8");
      assert.match(text, /nbdkit-ts: memory\[1\]: debug: /);
      // Said once, by the server in the background, not also by its parent.
      assert.equal(text.split("debug: memory: config key=size, value=1M").length, 2, text);
    });
  });

  test("-v logs start-up, negotiation and each request in nbdkit's words", async () => {
    const py = "h.pread(512, 0); h.pwrite(b'x' * 512, 4096, nbd.CMD_FLAG_FUA); h.flush(); " +
      "h.zero(8192, 0); h.trim(4096, 65536); h.cache(1024, 0); " +
      "h.block_status(65536, 0, lambda *a: 0)";
    const script = `nbdsh --base-allocation -u "$uri" -c ${shQuote(py)}`;
    const mine = await captive(["-v", "memory", "size=1M"], script);
    assert.equal(mine.status, 0, mine.stderr);
    const theirs = sh(`nbdkit -v -U - memory size=1M --run ${shQuote(script)}`);
    assert.equal(theirs.status, 0, theirs.stderr);
    // The request lines, each as nbdkit's (which name the plugin again).
    const requests = (stderr: string) =>
      stderr.split("\n").map((l) =>
        l.match(/debug: (?:memory: )?((?:pread|pwrite|flush|zero|trim|cache|extents)\b.*)/)?.[1]
      )
        .filter((l) => l !== undefined);
    assert.deepEqual(requests(mine.stderr), [
      "pread count=512 offset=0",
      "pwrite count=512 offset=4096 fua=1",
      "flush",
      "zero count=8192 offset=0 may_trim=1 fua=0 fast=0",
      "trim count=4096 offset=65536 fua=0",
      "cache count=1024 offset=0",
      "extents count=65536 offset=0 req_one=0",
    ]);
    assert.deepEqual(requests(mine.stderr), requests(theirs.stderr));
    for (
      const line of [
        "nbdkit-ts: debug: memory: config key=size, value=1M",
        "nbdkit-ts: debug: using thread model: parallel",
        "nbdkit-ts: memory[1]: debug: newstyle negotiation: client flags: 0x3",
        'nbdkit-ts: memory[1]: debug: open readonly=0 exportname="" tls=0',
        "nbdkit-ts: memory[1]: debug: newstyle negotiation: flags: export 0xded",
        "nbdkit-ts: memory[1]: debug: replying to NBD_OPT_GO with NBD_REP_ACK",
        "nbdkit-ts: memory[1]: debug: close",
        "nbdkit-ts: debug: memory: unload",
      ]
    ) assert.ok(mine.stderr.includes(`${line}\n`), `${line} in:\n${mine.stderr}`);
    // nbdkit's export flags for the same plugin, the same bits.
    assert.match(theirs.stderr, /newstyle negotiation: flags: export 0xded\n/);
    assert.match(mine.stderr, /bound to unix socket \/.*\/socket\n/);
  });

  test("--print-uri, -p and -i: TCP on loopback", async () => {
    const run = await nbdkitTs([
      "-i",
      "127.0.0.1",
      "-p",
      "0",
      "null",
      "size=512",
      "--run",
      'nbdinfo --size "$uri"; echo "$uri"',
    ]);
    assert.equal(run.status, 0, run.stderr);
    const [size, uri] = run.stdout.trim().split("\n");
    assert.equal(size, "512");
    assert.match(uri, /^nbd:\/\/127\.0\.0\.1:\d+$/);
    const printed = await nbdkitTs(["-U", "-", "--print-uri", "null", "size=512", "--run", "true"]);
    assert.match(printed.stdout, /^nbd\+unix:\/\/\/\?socket=\S+\/socket$/m);
  });

  test("--exit-with-parent: the server exits when its parent does", async () => {
    const { dir, cleanup } = scratch();
    try {
      const sock = join(dir, "sock");
      // The subshell is the parent; it exits once the server listens, leaving
      // it orphaned (not after a fixed time: a server still starting could
      // see its parent gone already).
      const r = await shAsync(
        `(${ourShell()} --exit-with-parent -U ${sock} null size=512 &
          ${shWaitFor(`-S ${sock}`, 30)}; test -S ${sock} && echo listening) ; echo done`,
      );
      assert.equal(r.stdout.trim(), "listening\ndone", r.stderr);
      let gone = false;
      for (let i = 0; i < 100 && !gone; i++) {
        gone = !existsSync(sock);
        await new Promise((r) => setTimeout(r, 100));
      }
      assert.ok(gone, "server exited and removed its socket");
    } finally {
      cleanup();
    }
  });

  test("--no-mc, --no-sr, --mask-handshake, -t as nbdinfo sees them", async () => {
    const nomc = await captive(["--no-mc", "null", "size=512"], 'nbdinfo --json "$uri"');
    assert.equal(nomc.status, 0, nomc.stderr);
    assert.deepEqual(JSON.parse(nomc.stdout).exports[0].contexts ?? [], []);
    const mc = await captive(["null", "size=512"], 'nbdinfo --json "$uri"');
    assert.deepEqual(JSON.parse(mc.stdout).exports[0].contexts, ["base:allocation"]);
    const nosr = await captive(["--no-sr", "null", "size=512"], 'nbdinfo --json "$uri"');
    assert.equal(JSON.parse(nosr.stdout).structured, false);
    const mask = await captive(["--mask-handshake=0", "null", "size=512"], 'nbdinfo --json "$uri"');
    assert.equal(JSON.parse(mask.stdout).protocol, "newstyle");
    const t1 = await captive(
      ["-t", "1", "memory", "size=4M"],
      'nbdcopy --requests=16 /dev/urandom "$uri" 2>/dev/null; nbdinfo --size "$uri"',
    );
    assert.equal(t1.stdout.trim().split("\n").pop(), "4194304");
    const t0 = await captive(["-t", "0", "null", "size=512"], 'nbdinfo --size "$uri"'); // 0: default
    assert.equal(t0.stdout, "512\n", t0.stderr);
  });

  test("-v prints debug lines; --log=null prints nothing", async () => {
    const v = await captive(["-v", "null", "size=512"], 'nbdinfo --size "$uri" >/dev/null');
    assert.match(v.stderr, /debug: newstyle negotiation: NBD_OPT_GO/);
    const quiet = await captive(
      ["--log=null", "memory", "size=512"],
      `nbdsh -u "$uri" -c '
h.set_strict_mode(0)
try:
    h.pread(512, 4096)
except nbd.Error:
    pass'`,
    );
    assert.equal(quiet.status, 0);
    assert.equal(quiet.stderr, "");
  });

  test("without -i, TCP serves IPv6 and IPv4 clients alike, as nbdkit", async () => {
    const port = await freePort();
    const r = await nbdkitTs([
      "-p",
      String(port),
      "memory",
      "size=1M",
      "--run",
      `nbdinfo --size 'nbd://[::1]:${port}' && nbdinfo --size nbd://127.0.0.1:${port} && echo "$uri"`,
    ]);
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, `1048576\n1048576\nnbd://localhost:${port}\n`);
  });

  test("-4 and -6: one family only, as nbdkit; with -i NAME, that family's addresses", async () => {
    // Which of an IPv4 and an IPv6 client is served, and what is refused.
    const probe = (port: number) =>
      `for a in 127.0.0.1 '[::1]'; do nbdinfo --size "nbd://$a:${port}" >/dev/null 2>&1 ` +
      `&& echo "$a served" || echo "$a refused"; done`;
    for (
      const [options, served] of [
        [["-4"], "127.0.0.1 served\n[::1] refused\n"],
        [["-6"], "127.0.0.1 refused\n[::1] served\n"],
        [["-4", "-6"], "127.0.0.1 refused\n[::1] served\n"], // the last one counts
        [["-6", "-4"], "127.0.0.1 served\n[::1] refused\n"],
        [["-4", "-i", "localhost"], "127.0.0.1 served\n[::1] refused\n"],
        [["-6", "-i", "::1"], "127.0.0.1 refused\n[::1] served\n"],
        [["-6", "-i", "::"], "127.0.0.1 refused\n[::1] served\n"],
      ] as const
    ) {
      const port = await freePort();
      const mine = await nbdkitTs([
        "-p",
        String(port),
        ...options,
        "null",
        "size=512",
        "--run",
        probe(port),
      ]);
      assert.equal(mine.status, 0, mine.stderr);
      assert.equal(mine.stdout, served, options.join(" "));
      const other = await freePort();
      const peer = sh(
        `nbdkit -p ${other} ${options.join(" ")} null size=512 --run ${shQuote(probe(other))}`,
      );
      assert.equal(peer.stdout, served, `nbdkit ${options.join(" ")}`);
    }
    // An address or a name without an address of that family: one line, exit 1, as nbdkit.
    for (
      const [options, message] of [
        [["-4", "-i", "::1"], "cannot listen on ::1: not an IPv4 address (-4)"],
        [["-6", "-i", "127.0.0.1"], "cannot listen on 127.0.0.1: not an IPv6 address (-6)"],
        [["-6", "-i", "localhost"], "cannot listen on localhost (-6): Name or service not known"],
      ] as const
    ) {
      const r = await nbdkitTs([
        "-p",
        String(await freePort()),
        ...options,
        "null",
        "size=512",
        "--run",
        "true",
      ]);
      assert.equal(r.status, 1, options.join(" "));
      assert.equal(r.stderr, `nbdkit-ts: error: ${message}\n`);
      assert.equal(
        sh(`nbdkit -p ${await freePort()} ${options.join(" ")} null size=512 --run true`).status,
        1,
      );
    }
  });

  test("SIGUSR1 ends the server as it ends nbdkit, and opens no debugger; SIGQUIT stops it", async () => {
    await withScratch(async (dir) => {
      const sock = join(dir, "sock");
      // Deno and Node start an inspector on 127.0.0.1:9229 on SIGUSR1; Deno
      // installs that handler half a second after start-up, so the signal
      // comes later than that.
      const usr1 = await shAsync(
        `${ourShell()} -f -U ${sock} memory size=1M & pid=$!
         ${shWaitFor(`-S ${sock}`)}
         sleep 2; kill -USR1 $pid; sleep 0.5
         if nbdinfo --size 'nbd+unix:///?socket=${sock}' 2>/dev/null; then echo serving; fi
         socat -u OPEN:/dev/null TCP:127.0.0.1:9229 2>/dev/null && echo inspector
         kill -0 $pid 2>/dev/null && echo alive && kill -KILL $pid
         wait $pid; echo "status=$?"`,
      );
      assert.equal(usr1.stdout, "status=138\n", usr1.stderr);
      assert.doesNotMatch(usr1.stderr, /Debugger listening/);
      // SIGUSR1's default action left that socket behind, as with nbdkit.
      const sock2 = join(dir, "sock2");
      const quit = await shAsync(
        `${ourShell()} -f -U ${sock2} memory size=1M & pid=$!
         ${shWaitFor(`-S ${sock2}`)}
         kill -QUIT $pid
         for i in $(seq 200); do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
         kill -0 $pid 2>/dev/null && echo alive && kill -KILL $pid
         wait $pid; echo "status=$?"; test -S ${sock2} || echo removed`,
      );
      assert.equal(quit.stdout, "status=0\nremoved\n", quit.stderr);
    });
  });

  test("a second SIGTERM stops a server that waits for a streaming reader", async () => {
    const { dir, cleanup } = scratch();
    try {
      const fifo = join(dir, "out.fifo");
      const sock = join(dir, "sock");
      const r = await shAsync(
        `${ourShell()} -f -U ${sock} streaming write=${fifo} & pid=$!
         ${shWaitFor(`-S ${sock}`)}
         nbdsh -u 'nbd+unix:///?socket=${sock}' -c 'h.pwrite(b"x" * 4096, 0)'
         kill -TERM $pid; sleep 1
         kill -0 $pid && echo waiting
         kill -TERM $pid; wait $pid; echo "status=$?"`,
      );
      assert.match(r.stdout, /^waiting\nstatus=1$/m, r.stderr);
      assert.match(r.stderr, /SIGTERM again: exiting without waiting/);
    } finally {
      cleanup();
    }
  });

  test("--run: a signal reaches the command, whose status is the exit status", async () => {
    const { dir, cleanup } = scratch();
    try {
      const started = join(dir, "started");
      const waitStarted = shWaitFor(`-e ${started}`);
      // Ctrl-C: SIGINT to the whole process group, server and command alike.
      const ctrlC = await shAsync(
        `setsid sh -c "${ourShell()} -U - memory size=1M --run 'touch ${started}; sleep 30'; ` +
          `echo status=\\$?" & leader=$!
         ${waitStarted}
         /bin/kill -s INT -- -$leader; wait $leader`,
      );
      assert.match(ctrlC.stdout, /^status=130$/m, ctrlC.stderr);
      assert.match(ctrlC.stderr, /^nbdkit-ts: external command was killed by signal 2$/m);
      rmSync(started);
      // kill(1) of the server alone: the command is ended too, not orphaned.
      const term = await shAsync(
        `${ourShell()} -U - memory size=1M --run 'echo $$ > ${started}; exec sleep 30' & pid=$!
         ${waitStarted}
         sleep 0.1; kill -TERM $pid; wait $pid; echo status=$?
         sleep 0.2; kill -0 $(cat ${started}) 2>/dev/null || echo gone`,
      );
      assert.match(term.stdout, /^status=143\ngone$/m, term.stderr);
      // An exit status over 128 is a status, not a signal.
      const code = await captive(["memory", "size=1M"], "exit 200");
      assert.equal(code.status, 200);
      assert.equal(code.stderr, "");
    } finally {
      cleanup();
    }
  });

  test("--run: a signal handled after the command ended keeps the command's status", async () => {
    // Ctrl-C reaches the command and the server together, and the server may
    // see the command's end first. Here the signal comes later on purpose,
    // while the stop waits for a streaming reader: it is a first signal, not a
    // second one, and the status stays the command's.
    const { dir, cleanup } = scratch();
    try {
      const fifo = join(dir, "out.fifo");
      const script = join(dir, "run.sh");
      const sent = join(dir, "sent");
      writeFileSync(
        script,
        `nbdsh -u "$uri" -c 'h.pwrite(b"x" * 4096, 0)'
         server=$PPID; (sleep 0.5; kill -INT $server; touch ${sent}) & exit 3`,
      );
      const r = await shAsync(
        `${ourShell()} -U - streaming write=${fifo} --run '. ${script}' & pid=$!
         ${shWaitFor(`-e ${sent}`, 20)}
         sleep 0.5; kill -0 $pid && echo waiting
         timeout 20 cat ${fifo} | wc -c; wait $pid; echo "status=$?"`,
      );
      assert.match(r.stdout, /^waiting\n4096\nstatus=3$/m, r.stderr);
      // One signal: the stop waited for the reader (on a slow machine, with the
      // notice that a second one would not wait).
      assert.doesNotMatch(r.stderr, /again: exiting without waiting/);
    } finally {
      cleanup();
    }
  });

  test("Deno without a permission: one line that names every permission needed", {
    skip: RUNTIME !== "deno",
  }, async () => {
    const all = ["read", "write", "net", "env", "sys", "run"];
    for (const missing of ["write", "sys", "run"]) {
      const allow = all.filter((p) => p !== missing).map((p) => `--allow-${p}`);
      const r = await run([
        process.execPath,
        "run",
        ...allow,
        "--no-check",
        join(ROOT, "cli.ts"),
        "-U",
        "-",
        "memory",
        "1M",
        "--run",
        "echo ran",
      ]);
      assert.equal(r.status, 1, r.stderr);
      assert.equal(r.stdout, "");
      assert.equal(r.stderr.split("\n").length, 2, r.stderr); // one line and its newline
      assert.match(r.stderr, new RegExp(`^nbdkit-ts: error: .*--allow-${missing} flag `));
      assert.match(r.stderr, /needs --allow-read, .* -A gives them all\)\n$/);
    }
  });

  test("a pid file that cannot be written: one line, exit status 1", async () => {
    const r = await captive(["-P", "/nonexistent/dir/x.pid", "memory", "size=1M"], "echo ran");
    assert.equal(r.status, 1);
    assert.equal(r.stdout, "");
    assert.equal(r.stderr, "nbdkit-ts: error: /nonexistent/dir/x.pid: No such file or directory\n");
  });

  test("listen errors name the socket or address", async () => {
    const { dir, cleanup } = scratch();
    try {
      const sock = join(dir, "sock");
      await failsWith(
        ["-f", "-U", join(dir, "no", "sock"), "null", "size=512"],
        /cannot listen on Unix socket .*\/no\/sock: No such file or directory$/m,
      );
      // Longer than sun_path holds: refused in nbdkit's words, not bound truncated (Node).
      const long = join(dir, "s".repeat(120));
      const length = new TextEncoder().encode(long).length;
      await failsWith(
        ["-U", long, "null", "size=512", "--run", "true"],
        new RegExp(`: path too long: length ${length} > max 107 bytes$`, "m"),
      );
      assert.deepEqual(readdirSync(dir), []);
      // A socket somebody listens on is theirs (it is not taken over as stale).
      const r = await shAsync(
        `${ourShell()} -f -U ${sock} null size=512 & pid=$!
         ${shWaitFor(`-S ${sock}`)}
         ${ourShell()} -f -U ${sock} null size=512; echo status=$?
         nbdinfo --size 'nbd+unix:///?socket=${sock}'
         kill $pid; wait $pid`,
      );
      assert.match(r.stdout, /^status=1\n512$/m, r.stderr);
      assert.match(
        r.stderr,
        /^nbdkit-ts: error: cannot listen on Unix socket \S+: Address already in use$/m,
      );
      assert.doesNotMatch(r.stderr, /null\[\d+\]: error/); // the probe of the socket is no error
    } finally {
      cleanup();
    }
  });

  test("a signal while the server starts is not lost: it stops once it listens", async () => {
    await withScratch(async (dir) => {
      // getReady runs before the server listens and takes a while: the
      // signals come then. A shell starts background commands with SIGQUIT
      // ignored, so a handler installed only once listening would miss it.
      const file = join(dir, "slow.ts");
      writeFileSync(
        file,
        `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
import { writeFileSync } from "node:fs";
export default definePlugin({
  name: "slow",
  getReady: async () => {
    writeFileSync(${JSON.stringify(join(dir, "starting"))}, "");
    await new Promise((r) => setTimeout(r, 1500));
  },
  open: () => null,
  getSize: () => 512,
  pread: (_h, buf) => void buf.fill(0),
});
`,
      );
      for (const signal of ["QUIT", "TERM"]) {
        const sock = join(dir, `${signal}.sock`);
        const r = await shAsync(
          `rm -f ${dir}/starting; ${ourShell()} -f -U ${sock} ${file} & pid=$!
           ${shWaitFor(`-e ${dir}/starting`)}
           kill -${signal} $pid
           for i in $(seq 100); do kill -0 $pid 2>/dev/null || break; sleep 0.05; done
           kill -0 $pid 2>/dev/null && echo alive && kill -KILL $pid
           wait $pid; echo "status=$?"; test -e ${sock} || echo removed`,
        );
        assert.equal(r.stdout, "status=0\nremoved\n", `SIG${signal}: ${r.stderr}`);
      }
      // With -U - and -P: the --run command never starts; one signal stops
      // cleanly (0), a second exits at once (1), and either way the private
      // directory goes, and the pid file there before (somebody else's,
      // since ours is written once listening) stays.
      const tmp = join(dir, "tmp");
      mkdirSync(tmp);
      for (const [signals, status] of [[["TERM"], "0"], [["TERM", "TERM"], "1"]] as const) {
        const r = await shAsync(
          `rm -f ${dir}/starting; echo other > ${dir}/x.pid
           TMPDIR=${tmp} ${ourShell()} -U - -P ${dir}/x.pid ${file} \
             --run 'touch ${dir}/ran' & pid=$!
           ${shWaitFor(`-e ${dir}/starting`)}
           for s in ${signals.join(" ")}; do kill -$s $pid; sleep 0.2; done
           wait $pid; echo "status=$?"; ls -A ${tmp}; ls ${dir}/ran 2>/dev/null; cat ${dir}/x.pid`,
        );
        assert.equal(r.stdout, `status=${status}\nother\n`, `${signals}: ${r.stderr}`);
      }
    });
  });

  test("block sizes a plugin states reach the client (with -v too); ones the spec forbids fail the open", async () => {
    await withScratch(async (dir) => {
      const file = join(dir, "sizes.ts");
      writeFileSync(
        file,
        `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
let sizes = [0, 0, 0];
export default definePlugin({
  name: "sizes",
  config: (_key, value) => { sizes = value.split(",").map(Number); },
  open: () => null,
  getSize: () => 1 << 20,
  blockSize: () => ({ minimum: sizes[0], preferred: sizes[1], maximum: sizes[2] }),
  pread: (_h, buf) => void buf.fill(0),
});
`,
      );
      const script =
        `nbdinfo --json "$uri" | grep block_size; nbdinfo --size "$uri" || echo failed`;
      const eval_ = (sizes: string) =>
        sh(
          `nbdkit -U - eval get_size='echo 1048576' block_size='echo ${
            sizes.replaceAll(",", " ")
          }' ` +
            `pread='head -c $3 /dev/zero' --run ${shQuote(script)}`,
        );
      for (const args of [[], ["-v"]]) {
        const r = await captive([...args, file, "sizes=512,4096,1048576"], script);
        assert.equal(r.status, 0, r.stderr);
        assert.equal(r.stdout, eval_("512,4096,1048576").stdout);
        assert.match(r.stdout, /"block_size_minimum": 512,\n.*"block_size_preferred": 4096,\n/);
      }
      // -1: no maximum; all 0: no constraints (nothing sent).
      const unbounded = await captive([file, "sizes=1,4096,-1"], script);
      assert.match(unbounded.stdout, /"block_size_maximum": 4294967295/);
      const none = await captive([file, "sizes=0,0,0"], script);
      assert.equal(none.stdout, "1048576\n");
      for (
        const [sizes, message] of [
          ["3,4096,1048576", "minimum block size to a power of 2"],
          ["131072,131072,131072", "minimum block size between 1 and 64K"],
          ["512,256,1048576", "preferred block size between 512 and 32M"],
          ["512,4096,1000", "maximum block size to -1 or a multiple of minimum block size"],
          ["4096,8192,4096", "minimum block size <= preferred <= maximum"],
        ]
      ) {
        const r = await captive([file, `sizes=${sizes}`], script);
        assert.equal(r.stdout, "failed\n", sizes);
        assert.match(
          r.stderr,
          new RegExp(`error: .*: plugin must set ${message.replace(/[-<=]/g, ".")}$`, "m"),
        );
        assert.match(
          eval_(sizes).stderr,
          new RegExp(`error: plugin must set ${message.replace(/[-<=]/g, ".")}$`, "m"),
        );
      }
    });
  });

  test("a plugin's debug() prints with -v only; parseBool reads booleans as nbdkit's", async () => {
    await withScratch(async (dir) => {
      const file = join(dir, "helpers.ts");
      writeFileSync(
        file,
        `import { debug, definePlugin, parseBool } from ${JSON.stringify(join(ROOT, "mod.ts"))};
let zeroes = true;
export default definePlugin({
  name: "helpers",
  config: (_key, value) => { zeroes = parseBool(value); debug(\`config \${value}\`); },
  open: ({ exportName }) => { debug(\`open \${JSON.stringify(exportName)}, zeroes=\${zeroes}\`); return null; },
  getSize: () => 512,
  pread: async (_h, buf, offset) => {
    await new Promise((resolve) => setTimeout(resolve, 1));
    debug(\`pread at \${offset}\`);
    buf.fill(zeroes ? 0 : 0xff);
  },
});
`,
      );
      const script = `nbdsh -u "$uri" -c 'print(h.pread(1, 0)[0])'`;
      const twice = `${script} && nbdsh -u "$uri" -c 'h.pread(1, 7)'`;
      const quiet = await captive([file, "zeroes=Off"], script);
      assert.equal(quiet.stdout, "255\n", quiet.stderr);
      assert.equal(quiet.stderr, "");
      const verbose = await captive(["-v", file, "zeroes=YES"], twice);
      assert.equal(verbose.stdout, "0\n", verbose.stderr);
      // Outside a connection, the plugin's name; inside one, its number too,
      // as nbdkit's lines have, after an await as well as before.
      assert.match(verbose.stderr, /^nbdkit-ts: helpers: debug: config YES$/m);
      assert.match(verbose.stderr, /^nbdkit-ts: helpers\[1\]: debug: open "", zeroes=true$/m);
      assert.match(verbose.stderr, /^nbdkit-ts: helpers\[1\]: debug: pread at 0$/m);
      assert.match(verbose.stderr, /^nbdkit-ts: helpers\[2\]: debug: pread at 7$/m);
      assert.doesNotMatch(
        verbose.stderr,
        /helpers\[2\]: debug: pread at 0|helpers\[1\]: debug: pread at 7/,
      );
      const bad = await captive([file, "zeroes=maybe"], "true");
      assert.equal(bad.status, 1);
      assert.equal(bad.stderr, "nbdkit-ts: error: could not decipher boolean (maybe)\n");
      // nbdkit's message for the same value of one of its boolean parameters.
      assert.match(
        sh("nbdkit -U - sparse-random 1M random-content=maybe --run true").stderr,
        /^nbdkit: error: could not decipher boolean \(maybe\)$/m,
      );
    });
  });

  test("a plugin from a .ts path", async () => {
    const { dir, cleanup } = scratch();
    try {
      const file = join(dir, "pattern.ts");
      writeFileSync(
        file,
        `import { definePlugin } from ${JSON.stringify(join(ROOT, "mod.ts"))};
export default definePlugin({
  name: "pattern",
  open: () => null,
  getSize: () => 4096,
  pread: (_h, buf, offset) => { for (let i = 0; i < buf.length; i++) buf[i] = (offset + i) & 0xff; },
});
`,
      );
      const r = await captive(
        [file],
        `nbdsh -u "$uri" -c 'print(list(h.pread(4, 254)), h.is_read_only())'`,
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout.trim(), "[254, 255, 0, 1] True");
    } finally {
      cleanup();
    }
  });
});

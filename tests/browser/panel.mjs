// The arenafs panel in ComfyUI's real front end, driven in Debian's chromium (headless) as a
// person uses it (tests/it/comfyui.rs): the Arena settings, the copy status badge, the dry run.
//   node panel.mjs URL OUTDIR           the settings, a dry run, a copy in progress
//   node panel.mjs URL OUTDIR offline   prints READY once the page shows a reachable daemon,
//                                       then waits for the badge and a toast to say the NAS is
//                                       offline (the test takes the NAS away after READY)
// Prints OK; screenshots go to OUTDIR.
import { chromium } from "/var/tmp/arenafs-node/node_modules/playwright-core/index.mjs";

const [url, outdir, mode] = process.argv.slice(2);
const fail = (msg) => { console.error(msg); process.exit(1); };

// Closes the settings dialog (an open drop-down takes the first Escape).
async function closeDialogs(page) {
  for (let i = 0; i < 10 && (await page.locator(".p-dialog-mask").count()) > 0; i++) {
    const close = page.locator(".p-dialog-mask .p-dialog-close-button, .p-dialog-mask button[aria-label=Close]");
    if (i % 2 === 0 && (await close.count()) > 0) {
      await close.last().click({ force: true });
    } else {
      await page.keyboard.press("Escape");
    }
    await page.waitForTimeout(300);
  }
  if ((await page.locator(".p-dialog-mask").count()) > 0) fail("a dialog stays open");
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", args: ["--no-sandbox"] });
try {
  const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
  await page.goto(url);
  await page.waitForSelector("#arenafs-badge", { timeout: 90000 });
  await page.waitForFunction(() => /arenafs: red/.test(document.querySelector("#arenafs-state")?.textContent), null, { timeout: 30000 });
  // The first start shows the templates; close them.
  await closeDialogs(page);
  if (mode === "offline") {
    // A second page whose websocket never delivers a message (a proxy that drops it, a desktop
    // build that keeps reconnecting): its badge must learn of the NAS by asking the server.
    const deaf = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    let sockets = 0;
    await deaf.routeWebSocket(/\/ws/, () => { sockets++; });
    await deaf.goto(url);
    await deaf.waitForFunction(() => /arenafs: red/.test(document.querySelector("#arenafs-state")?.textContent),
      null, { timeout: 90000 });
    if (sockets === 0) fail("the deaf page opened no websocket: nothing was held back");
    console.log("READY");
    for (const [p, name] of [[page, "arena-offline.png"], [deaf, "arena-offline-no-websocket.png"]]) {
      await p.waitForFunction(() => /NAS offline/.test(document.querySelector("#arenafs-state")?.textContent),
        null, { timeout: 60000 });
      await p.locator(".p-toast-message").filter({ hasText: "NAS offline" }).first().waitFor({ timeout: 10000 });
      await p.screenshot({ path: `${outdir}/${name}` });
    }
    console.log("OK");
    process.exit(0);
  }

  // Settings -> Arena: the daemon's values are shown; a change reaches the daemon.
  await page.keyboard.press("Control+Comma");
  await page.getByText("Arena", { exact: true }).first().click();
  const row = page.locator(".setting-item, [class*=setting]").filter({ hasText: "Model Discovery" }).last();
  await row.waitFor({ timeout: 20000 });
  await page.screenshot({ path: `${outdir}/arena-settings.png` });
  await row.getByRole("combobox").click();
  await page.getByRole("option", { name: "Manual Only" }).click();
  const daemonValue = async () => (await (await fetch(`${url}/arenafs/settings`)).json()).settings.ARENA_CACHE_DISCOVERY;
  for (let i = 0; (await daemonValue()) !== "manual_only"; i++) {
    if (i > 100) fail(`the daemon's discovery is still ${await daemonValue()}`);
    await page.waitForTimeout(100);
  }
  await page.screenshot({ path: `${outdir}/arena-settings-changed.png` });
  await closeDialogs(page);

  // A workflow that upscales with the big model, opened in the editor; Dry-run lists its model.
  const prompt = {
    "1": { class_type: "LoadImage", inputs: { image: "p.png" } },
    "2": { class_type: "UpscaleModelLoader", inputs: { model_name: "big.safetensors" } },
    "3": { class_type: "ImageUpscaleWithModel", inputs: { upscale_model: ["2", 0], image: ["1", 0] } },
    "4": { class_type: "SaveImage", inputs: { images: ["3", 0], filename_prefix: "p" } },
  };
  await page.evaluate(async (p) => {
    const { app } = await import("/scripts/app.js");
    await app.loadApiJson(p, "arena-test");
  }, prompt);
  await page.click("#arenafs-dryrun");
  await page.waitForFunction(() => /upscale_models\/big\.safetensors: on the NAS, cached none/.test(
    document.querySelector("#arenafs-dryrun-result")?.textContent), null, { timeout: 30000 });
  await page.screenshot({ path: `${outdir}/arena-dryrun.png` });

  // Back to workflow_only through the panel, then Run: the badge shows the copy in progress.
  await page.keyboard.press("Control+Comma");
  await page.getByText("Arena", { exact: true }).first().click();
  await row.getByRole("combobox").click();
  await page.getByRole("option", { name: "Workflow Only" }).click();
  for (let i = 0; (await daemonValue()) !== "workflow_only"; i++) {
    if (i > 100) fail("discovery did not go back to workflow_only");
    await page.waitForTimeout(100);
  }
  await closeDialogs(page);
  await page.getByRole("button", { name: "Run", exact: true }).click();
  await page.waitForFunction(() => /big\.safetensors \d+%/.test(document.querySelector("#arenafs-jobs")?.textContent),
    null, { timeout: 30000 });
  await page.screenshot({ path: `${outdir}/arena-progress.png` });
  await page.waitForFunction(() => /idle/.test(document.querySelector("#arenafs-state")?.textContent), null, { timeout: 60000 });
  console.log("OK");
} finally {
  await browser.close();
}

// Opens every workflow of the pack from the real frontend's Templates dialog in Debian's chromium, then queues
// one of them and watches its progress. Driven by tests/integration/test_browser.py, which starts the server.
//
//   node check_workflows.mjs <config.json>
// config: {url, module, workflows: [names], out: folder, chromium: path,
//          queue: {workflow, widgets: {"<node id>": {"<widget>": value}}, timeout_s}}
// Writes <out>/report.json: per workflow the graph's node types, the nodes the frontend could not create, and
// the API prompt of the frontend's own graphToPrompt; for the queued run the progress values seen; console
// errors and failed requests. Screenshots go to <out>/*.png.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import puppeteer from 'puppeteer-core';

const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const report = {workflows: {}, console: [], failedRequests: [], queue: null};
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'cidm-chromium-'));
const browser = await puppeteer.launch({
  executablePath: config.chromium,
  headless: true,
  defaultViewport: {width: 1920, height: 1200},
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         `--user-data-dir=${profile}`],
});

async function closeDialogs(page) {
  // Close whatever the frontend opened on its own (the Templates dialog on a first visit, a warning dialog).
  for (let i = 0; i < 3; i++) {
    const open = await page.$$('[role=dialog]');
    if (!open.length) return;
    await page.keyboard.press('Escape');
    await sleep(400);
  }
}

async function openTemplate(page, name) {
  await closeDialogs(page);
  await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates'));
  await page.waitForFunction(() => document.querySelector('[role=dialog]')?.innerText.includes('Templates'),
                             {timeout: 30000});
  const category = await page.waitForSelector(`::-p-text(${config.module})`, {timeout: 30000});
  await category.click();
  await page.waitForFunction(() => [...document.querySelectorAll('[role=dialog] img')].every((img) => img.complete),
                             {timeout: 15000}).catch(() => {});
  await sleep(1000);
  await page.screenshot({path: path.join(config.out, 'templates-dialog.png')});
  const before = await page.evaluate(() => window.app.graph.nodes.length);
  // the card whose text is exactly the name: a text selector matches substrings, so region_composition would
  // also match region_composition_auto
  const card = await page.waitForFunction((wanted) => [...document.querySelectorAll('[role=dialog] *')].find(
    (element) => element.childElementCount === 0 && element.textContent.trim() === wanted), {timeout: 30000}, name);
  await card.asElement().click();
  await page.waitForFunction(() => !document.querySelector('[role=dialog]')?.innerText.includes('Templates'),
                             {timeout: 60000});
  await sleep(1500);
  return before;
}

async function inspectGraph(page) {
  return page.evaluate(async () => {
    const app = window.app;
    const ctx = app.canvas.ctx;
    ctx.save();
    ctx.font = app.canvas.title_text_font;  // the font the canvas draws titles in
    const nodes = app.graph.nodes.map((node) => ({
      id: node.id, type: node.type, title: node.title,
      missing: !!node.has_errors || (!node.constructor.nodeData && !['Note', 'MarkdownNote'].includes(node.type)),
      titleWidth: ctx.measureText(node.title).width, width: node.size[0],
      // the area the node covers on the canvas as the frontend laid it out: its title bar sits above pos
      box: [node.pos[0], node.pos[1] - window.LiteGraph.NODE_TITLE_HEIGHT, node.size[0],
            node.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT],
      widgets: (node.widgets || []).map((widget) => widget.name),
    }));
    ctx.restore();
    const dialogs = [...document.querySelectorAll('[role=dialog]')].map((dialog) => dialog.innerText.slice(0, 400));
    const prompt = (await app.graphToPrompt()).output;
    return {nodes, dialogs, prompt};
  });
}

const page = await browser.newPage();
page.on('console', (message) => {
  if (message.type() === 'error' || message.type() === 'warn') {
    report.console.push({type: message.type(), text: message.text(), url: message.location()?.url || ''});
  }
});
page.on('pageerror', (error) => report.console.push({type: 'pageerror', text: String(error.stack || error), url: ''}));
page.on('requestfailed', (request) => report.failedRequests.push({url: request.url(), status: 'failed'}));
page.on('response', (response) => {
  if (response.status() >= 400) report.failedRequests.push({url: response.url(), status: response.status()});
});

try {
  await page.goto(config.url, {waitUntil: 'networkidle2', timeout: 180000});
  await page.waitForFunction(() => window.app && window.app.graph && window.app.extensionManager, {timeout: 180000});
  // Full node detail at any zoom, so the screenshots of whole workflows stay readable.
  await page.evaluate(() => window.app.extensionManager.setting.set('LiteGraph.Canvas.MinFontSizeForLOD', 0));
  await sleep(2000);

  for (const name of config.workflows) {
    await openTemplate(page, name);
    const graph = await inspectGraph(page);
    await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.Canvas.FitView'));
    await sleep(800);
    await page.screenshot({path: path.join(config.out, `${name}.png`)});
    report.workflows[name] = graph;
  }

  if (config.queue) {
    const {workflow, widgets, timeout_s: timeout} = config.queue;
    await openTemplate(page, workflow);
    await page.evaluate((widgets) => {
      for (const [id, values] of Object.entries(widgets)) {
        const node = window.app.graph.getNodeById(Number(id));
        for (const [name, value] of Object.entries(values)) {
          node.widgets.find((widget) => widget.name === name).value = value;
        }
      }
      window.cidmSeen = {progress: [], nodeProgress: [], done: null, errors: []};
      const api = window.app.api;
      api.addEventListener('progress', (event) => window.cidmSeen.progress.push(event.detail));
      api.addEventListener('execution_success', () => { window.cidmSeen.done = 'success'; });
      api.addEventListener('execution_error', (event) => {
        window.cidmSeen.done = 'error';
        window.cidmSeen.errors.push(event.detail);
      });
    }, widgets);
    await page.evaluate(() => window.app.extensionManager.command.execute('Comfy.QueuePrompt'));
    const deadline = Date.now() + timeout * 1000;
    let shot = false;
    while (Date.now() < deadline) {
      const state = await page.evaluate(() => {
        // The bar the canvas draws on a running node: LGraphNode.progress, set from the progress events.
        const running = window.app.graph.nodes.filter((node) => node.progress > 0 && node.progress < 1)
          .map((node) => ({id: node.id, progress: node.progress}));
        window.cidmSeen.nodeProgress.push(...running);
        return {running: running.length, done: window.cidmSeen.done};
      });
      if (state.running && !shot) {
        await page.evaluate(() => {  // frame the running node at full size
          const node = window.app.graph.nodes.find((n) => n.progress > 0 && n.progress < 1);
          if (!node) return;
          window.app.canvas.ds.scale = 1;
          window.app.canvas.centerOnNode(node);
          window.app.canvas.setDirty(true, true);
        });
        await sleep(300);
        await page.screenshot({path: path.join(config.out, 'queued-progress.png')});
        shot = true;
      }
      if (state.done) break;
      await sleep(250);
    }
    await sleep(1500);
    await page.screenshot({path: path.join(config.out, 'queued-finished.png')});
    report.queue = await page.evaluate(() => window.cidmSeen);
    // What Inspect Aggregation Weights shows on the node after the run: its table, then a close-up.
    report.queue.inspect = await page.evaluate(async () => {
      const node = window.app.graph.nodes.find((n) => n.type === 'CIDM_InspectAggregationWeights');
      if (!node) return null;
      window.app.canvas.ds.scale = 1;
      window.app.canvas.centerOnNode(node);
      window.app.canvas.setDirty(true, true);
      return {id: node.id, table: node.widgets.find((w) => w.name === 'weights_table')?.value ?? null,
              size: node.size, saved: node.serialize().widgets_values,
              prompt: (await window.app.graphToPrompt()).output[String(node.id)].inputs};
    });
    if (report.queue.inspect) {
      await sleep(800);
      await page.screenshot({path: path.join(config.out, 'inspect-weights.png')});
    }
  }
} catch (error) {
  report.fatal = String(error.stack || error);
  await page.screenshot({path: path.join(config.out, 'fatal.png')}).catch(() => {});
} finally {
  fs.writeFileSync(path.join(config.out, 'report.json'), JSON.stringify(report, null, 1));
  await browser.close();
  fs.rmSync(profile, {recursive: true, force: true});
}

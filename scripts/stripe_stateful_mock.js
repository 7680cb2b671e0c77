// Runs stripe-stateful-mock (npm, installed by scripts/stripe-mock.sh) on 127.0.0.1
// only: its own CLI binds all interfaces. Usage: node stripe_stateful_mock.js PORT
const path = require("path");
const mock = require(path.join(__dirname, "..", ".run", "ssm", "node_modules", "stripe-stateful-mock"));
const port = parseInt(process.argv[2], 10);
mock.createExpressApp().listen(port, "127.0.0.1", () => console.log(`stripe-stateful-mock on 127.0.0.1:${port}`));

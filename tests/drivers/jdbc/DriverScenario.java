// pgJDBC through the proxy: `java DriverScenario JDBC_URL [batches-only] < scenario` runs the scenario
// (tab-separated lines, written by tests/test_drivers_jdbc.py) with the connection properties the URL
// carries (the mode under test) and prints its results as one JSON object (batches-only: the error
// batches alone, for a direct server).

import java.io.BufferedReader;
import java.io.InputStreamReader;
import java.nio.charset.StandardCharsets;
import java.sql.Array;
import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import org.postgresql.PGStatement;

public final class DriverScenario {
    private static final String EMBED = "SELECT azure_local_ai.create_embeddings(?, ?)";
    private static final String INSERT = "INSERT INTO batch_rows VALUES (?, azure_local_ai.create_embeddings(?, ?)::vector)";

    private final Connection conn;
    private final Map<String, List<String[]>> scenario;
    private final String model;

    private DriverScenario(Connection conn, Map<String, List<String[]>> scenario) {
        this.conn = conn;
        this.scenario = scenario;
        this.model = value("model");
    }

    public static void main(String[] args) throws Exception {
        Map<String, List<String[]>> scenario = readScenario();
        try (Connection conn = DriverManager.getConnection(args[0])) {
            boolean batchesOnly = args.length > 1 && args[1].equals("batches-only");
            System.out.print(new DriverScenario(conn, scenario).run(batchesOnly));
        }
    }

    /** Lines of "key<TAB>field<TAB>field...", grouped by key in their order. */
    private static Map<String, List<String[]>> readScenario() throws Exception {
        Map<String, List<String[]>> scenario = new LinkedHashMap<>();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        for (String line; (line = in.readLine()) != null; ) {
            String[] fields = line.split("\t", -1);
            scenario.computeIfAbsent(fields[0], k -> new ArrayList<>()).add(java.util.Arrays.copyOfRange(fields, 1, fields.length));
        }
        return scenario;
    }

    private String value(String key) {
        return scenario.get(key).get(0)[0];
    }

    private List<String> values(String key) {
        List<String> out = new ArrayList<>();
        for (String[] fields : scenario.get(key)) out.add(fields[0]);
        return out;
    }

    private String run(boolean batchesOnly) throws SQLException {
        Json out = new Json();
        try (Statement st = conn.createStatement()) {
            st.execute("CREATE TEMP TABLE batch_rows (id bigint PRIMARY KEY, v vector(384))");
        }
        if (!batchesOnly) {
            calls(out);
            batch(out);
        }
        errorBatches(out);
        return out.close();
    }

    private void calls(Json out) throws SQLException {
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT azure_local_ai.create_embeddings('" + model + "', '"
                     + value("plain").replace("'", "''") + "')")) {
            rs.next();
            out.raw("plain", floats(rs.getArray(1)));
        }
        out.raw("param", embed(value("param")));
        prepared(out);
        withIds(out);
        nearest(out);
        out.raw("settings", single("SELECT azure_local_ai.get_setting()", null));
        out.string("setting", single("SELECT azure_local_ai.get_setting(?)", value("setting_key")));
        out.raw("metadata", single("SELECT azure_local_ai.model_metadata(?)", model));
    }

    private String embed(String text) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(EMBED)) {
            ps.setString(1, model);
            ps.setString(2, text);
            return first(ps);
        }
    }

    private static String first(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            rs.next();
            return floats(rs.getArray(1));
        }
    }

    /** One PreparedStatement executed for every text; whether the driver had switched to a named
     * server-side statement is recorded after each execution. */
    private void prepared(Json out) throws SQLException {
        List<String> vectors = new ArrayList<>();
        List<String> serverSide = new ArrayList<>();
        try (PreparedStatement ps = conn.prepareStatement(EMBED)) {
            for (String text : values("prepared")) {
                ps.setString(1, model);
                ps.setString(2, text);
                vectors.add(first(ps));
                serverSide.add(String.valueOf(ps.unwrap(PGStatement.class).isUseServerPrepare()));
            }
        }
        out.raw("prepared", "[" + String.join(",", vectors) + "]");
        out.raw("server_prepared", "[" + String.join(",", serverSide) + "]");
    }

    /** The array overload with ids, read at once, then in a transaction two rows at a time (a fetch
     * size makes the driver Execute with a row limit and the server suspend the portal). */
    private void withIds(Json out) throws SQLException {
        out.raw("with_ids", withIds(0));
        conn.setAutoCommit(false);
        out.raw("with_ids_fetched", withIds(2));
        conn.commit();
        conn.setAutoCommit(true);
    }

    private String withIds(int fetchSize) throws SQLException {
        String[] inputs = values("input").toArray(new String[0]);
        List<String> idTexts = values("id");
        Long[] ids = new Long[idTexts.size()];
        for (int i = 0; i < ids.length; i++) ids[i] = Long.parseLong(idTexts.get(i));
        List<String> rows = new ArrayList<>();
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT id, embedding FROM azure_local_ai.create_embeddings(?, ?::text[], ?::bigint[])")) {
            ps.setFetchSize(fetchSize);
            ps.setString(1, model);
            ps.setArray(2, conn.createArrayOf("text", inputs));
            ps.setArray(3, conn.createArrayOf("bigint", ids));
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) rows.add("[" + rs.getLong(1) + "," + floats(rs.getArray(2)) + "]");
            }
        }
        return "[" + String.join(",", rows) + "]";
    }

    private void nearest(Json out) throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("CREATE TEMP TABLE docs (body text, v vector(384))");
        }
        try (PreparedStatement ps = conn.prepareStatement(
                "INSERT INTO docs VALUES (?, azure_local_ai.create_embeddings(?, ?)::vector)")) {
            for (String doc : values("doc")) {
                ps.setString(1, doc);
                ps.setString(2, model);
                ps.setString(3, doc);
                ps.executeUpdate();
            }
        }
        List<String> rows = new ArrayList<>();
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT body, v <=> azure_local_ai.create_embeddings(?, ?)::vector FROM docs ORDER BY 2")) {
            ps.setString(1, model);
            ps.setString(2, value("query"));
            try (ResultSet rs = ps.executeQuery()) {
                while (rs.next()) rows.add("[" + Json.quote(rs.getString(1)) + "," + rs.getDouble(2) + "]");
            }
        }
        out.raw("nearest", "[" + String.join(",", rows) + "]");
    }

    private String single(String sql, String parameter) throws SQLException {
        try (PreparedStatement ps = conn.prepareStatement(sql)) {
            if (parameter != null) ps.setString(1, parameter);
            try (ResultSet rs = ps.executeQuery()) {
                rs.next();
                return rs.getString(1);
            }
        }
    }

    /** A JDBC batch (addBatch/executeBatch) of inserts whose values the proxy computes, read back. */
    private void batch(Json out) throws SQLException {
        List<String> texts = values("batch");
        try (PreparedStatement ps = conn.prepareStatement(INSERT)) {
            for (int i = 0; i < texts.size(); i++) {
                ps.setLong(1, i);
                ps.setString(2, model);
                ps.setString(3, texts.get(i));
                ps.addBatch();
            }
            ps.executeBatch();
        }
        List<String> vectors = new ArrayList<>();
        try (Statement st = conn.createStatement();
             ResultSet rs = st.executeQuery("SELECT v::real[] FROM batch_rows ORDER BY id")) {
            while (rs.next()) vectors.add(floats(rs.getArray(1)));
        }
        out.raw("batch", "[" + String.join(",", vectors) + "]");
        clear();
    }

    /** Each named batch has a failing row in the middle: its SQLSTATE, the update counts the driver
     * reports, the rows kept, and a statement run afterwards on the same connection. */
    private void errorBatches(Json out) throws SQLException {
        Map<String, List<String[]>> batches = new LinkedHashMap<>();
        for (String[] fields : scenario.get("error_row")) {
            batches.computeIfAbsent(fields[0], k -> new ArrayList<>()).add(fields);
        }
        Json all = new Json();
        for (Map.Entry<String, List<String[]>> entry : batches.entrySet()) {
            Json result = new Json();
            try (PreparedStatement ps = conn.prepareStatement(INSERT)) {
                for (String[] row : entry.getValue()) {
                    ps.setLong(1, Long.parseLong(row[1]));
                    ps.setString(2, row[2]);
                    ps.setString(3, row[3]);
                    ps.addBatch();
                }
                ps.executeBatch();
                result.raw("ok", "true");
            } catch (BatchUpdateException e) {
                SQLException cause = e.getNextException() != null ? e.getNextException() : e;
                result.raw("ok", "false");
                result.string("sqlstate", cause.getSQLState());
                result.string("message", cause.getMessage());
                List<String> counts = new ArrayList<>();
                for (int count : e.getUpdateCounts()) counts.add(String.valueOf(count));
                result.raw("update_counts", "[" + String.join(",", counts) + "]");
            }
            List<String> kept = new ArrayList<>();
            try (Statement st = conn.createStatement();
                 ResultSet rs = st.executeQuery("SELECT id FROM batch_rows ORDER BY id")) {
                while (rs.next()) kept.add(String.valueOf(rs.getLong(1)));
            }
            result.raw("kept", "[" + String.join(",", kept) + "]");
            result.raw("after", embed(value("after_error")));
            all.raw(entry.getKey(), result.close());
            clear();
        }
        out.raw("error_batches", all.close());
    }

    private void clear() throws SQLException {
        try (Statement st = conn.createStatement()) {
            st.execute("TRUNCATE batch_rows");
        }
    }

    /** A real[] as a JSON array; Float.toString gives the shortest text that reads back as the same float. */
    private static String floats(Array array) throws SQLException {
        Float[] values = (Float[]) array.getArray();
        StringBuilder sb = new StringBuilder("[");
        for (int i = 0; i < values.length; i++) sb.append(i == 0 ? "" : ",").append(values[i]);
        return sb.append("]").toString();
    }

    /** Just enough JSON writing for the results: an object built member by member. */
    private static final class Json {
        private final StringBuilder sb = new StringBuilder("{");

        void raw(String key, String json) {
            sb.append(sb.length() > 1 ? "," : "").append(quote(key)).append(":").append(json);
        }

        void string(String key, String value) {
            raw(key, quote(value));
        }

        String close() {
            return sb.append("}").toString();
        }

        static String quote(String s) {
            if (s == null) return "null";
            StringBuilder q = new StringBuilder("\"");
            for (char c : s.toCharArray()) {
                if (c == '"' || c == '\\') q.append('\\').append(c);
                else if (c < 0x20) q.append(String.format("\\u%04x", (int) c));
                else q.append(c);
            }
            return q.append('"').toString();
        }
    }
}

// Runs pixelmed's DicomSRValidator (SR and KOS) or DicomInstanceValidator (other objects) on several files in one
// JVM, so the validators' stylesheets are compiled once. Run with the JDK's source launcher:
//   java -cp /usr/share/java/pixelmed.jar tests/PixelmedValidate.java FILE...
// Each file's report follows a line "=== FILE".
import com.pixelmed.dicom.AttributeList;
import com.pixelmed.dicom.TagFromName;
import com.pixelmed.validate.DicomInstanceValidator;
import com.pixelmed.validate.DicomSRValidator;

public class PixelmedValidate {
    public static void main(String[] args) throws Exception {
        DicomSRValidator sr = null;
        DicomInstanceValidator instance = null;
        for (String path : args) {
            System.out.println("=== " + path);
            AttributeList list = new AttributeList();
            list.read(path);
            String sopClass = Attribute_getString(list);
            if (sopClass.startsWith("1.2.840.10008.5.1.4.1.1.88.")) {
                if (sr == null) sr = new DicomSRValidator();
                System.out.println(sr.validate(list));
            } else {
                if (instance == null) instance = new DicomInstanceValidator();
                System.out.println(instance.validate(list));
            }
        }
    }

    private static String Attribute_getString(AttributeList list) {
        return com.pixelmed.dicom.Attribute.getSingleStringValueOrEmptyString(list, TagFromName.SOPClassUID);
    }
}
